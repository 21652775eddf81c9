/* tlb_shootdown: a user-mode reader must never use a stale translation after another CPU changed the PTE
 * and the flush protocol completed (SDM vol. 3 4.10.4 and 4.10.5, "propagation of paging-structure changes
 * to multiple processors": the CPU that changes a PTE makes the others invalidate, e.g. with an IPI whose
 * handler runs INVLPG or reloads CR3). Linux 6.1 on KVM also uses KVM_FEATURE_PV_TLB_FLUSH: for a target vCPU
 * whose steal-time record says PREEMPTED it sets KVM_VCPU_FLUSH_TLB in that record (cmpxchg of `preempted`
 * from 1 to 3) instead of sending the IPI, and KVM flushes that vCPU's TLB before it runs it again
 * (Documentation/virt/kvm/x86/msr.rst, MSR_KVM_STEAL_TIME).
 *
 * CPU 0 is the writer (ring 0), every other CPU a reader that runs a loop at CPL 3 over a user page X (a
 * 4 KiB PTE with U/S = 1) and a "published" word on a user page that never changes. The writer does rounds,
 * each round r one of five kinds:
 * - remap: write tag r into a fresh page of a pool, point PTE(X) at it, flush, publish r;
 * - unmap: write tag r into a fresh page, clear PTE(X) (not present), flush, point PTE(X) at the page (no
 *   flush: a not-present entry is not cached), publish r; the reader's faults on X in between are retried;
 * - wp: the copy-on-write shape: PTE(X) alternates writable (even rounds, no flush needed) and
 *   write-protected (odd rounds: flush, then publish); the reader writes through X with a locked XCHG;
 * - ptswap: a page-table page reused, as a new process's are: a page from a pool of page-table pages is
 *   cleared (REP STOSQ), given X's entry (a fresh tagged page) while unlinked, then linked into the PDE in
 *   place of the previous one; flush, publish;
 * - large: X is a 2 MiB page (PDE with PS) remapped to a fresh tagged 2 MiB page; flush, publish.
 * A reader that saw published == r must then read a tag >= r through X (all kinds but wp), and its write
 * through X must fault if r is odd and the writer has not begun round r + 1 (wp). Anything else is a stale
 * translation, counted (the first few printed: round, tag, CPU).
 * Flush methods: `ipi` (a fixed IPI to each reader, whose ring-0 handler runs INVLPG X and acknowledges; the
 * writer waits for every acknowledgement), `cr3` (the handler reloads CR3 instead), `pv` (Linux's: every CPU
 * enables steal time; per reader, if its `preempted` byte has bit 0 set and a cmpxchg to byte | 2 succeeds,
 * no IPI; otherwise the IPI), `none` (the control: change and publish with no flush: shows whether this host
 * lets a user-mode reader see the old page at all). Phases: every kind with `ipi` and with `none`, remap
 * with `cr3`, remap and wp with `pv`. The ipi and cr3 phases must never be stale (checks). The pv and none
 * phases print figures (`COUNT:` lines); a stale read in a pv round prints `HOST-BUG pv-tlb-flush stale=N`
 * (not a check: it needs the host to show a reader preempted, which can only happen on a loaded host; run it
 * beside busy loops). The writer also samples the readers' `preempted` bytes all along, and at the end sets
 * each idle reader's byte to FLUSH_TLB and wakes it, to see whether the host rewrites the record at the
 * vCPU's next entry. On this host KVM never marks a vCPU preempted, so the pv phases take the IPI path every
 * round (docs/kvm-facts.md, "Remote TLB flushes here").
 * On 1 CPU the reader checks SKIP (they need a second CPU).
 * Command line: ms=N (time bound per phase, default 300), verbose=1 (more lines), ad=0 (X's PTEs without the
 * accessed and dirty bits, which the writer otherwise sets). */
#include "usermode.h"


#define USER_VA 0x8000000000ul      /* PML4 slot 1: nothing else is mapped there */
#define PTE_P 1ul
#define PTE_W 2ul
#define PTE_U 4ul
#define PTE_A 0x20ul                /* set by the writer: KVM then never writes the PTE itself */
#define PTE_D 0x40ul
/* User page table: 0 the code, 1 the shared page, 2 the exit page (never mapped), 8 X, 16 + c CPU c's page. */
#define CODE_PT 0
#define SHARED_PT 1
#define EXIT_PT 2
#define X_PT 8
#define CPU_PT 16
#define SHARED_VA (USER_VA + SHARED_PT * 4096ul)
#define EXIT_VA (USER_VA + EXIT_PT * 4096ul)
#define X_VA (USER_VA + X_PT * 4096ul)
#define X_PTSWAP_VA (USER_VA + (1ul << 21)) /* PD index 1: its page table is swapped (ptswap) */
#define X_LARGE_VA (USER_VA + (2ul << 21))  /* PD index 2: a 2 MiB page (large) */
#define PT_POOL 8                   /* page-table pages for ptswap */
#define LARGE_BASE (32ul << 20)     /* 2 MiB pages for large: 32-48 MiB of RAM, identity-mapped */
#define LARGE_POOL 8
#define PDE_PS 0x80ul
#define CPU_VA(c) (USER_VA + (CPU_PT + (c)) * 4096ul)

#define V_FLUSH 0x50
#define POOL 64                     /* pages X points at in turn: a stale one holds an older tag */

#define MSR_KVM_STEAL_TIME 0x4b564d03
#define KVM_FEATURE_STEAL_TIME (1u << 5)
#define KVM_FEATURE_PV_TLB_FLUSH (1u << 9)
#define KVM_VCPU_PREEMPTED 1
#define KVM_VCPU_FLUSH_TLB 2

struct kvm_steal_time {
	u64 steal;
	u32 version;
	u32 flags;
	volatile u8 preempted;
	u8 u8_pad[3];
	u32 pad[11];
} __attribute__((aligned(64)));
_Static_assert(sizeof(struct kvm_steal_time) == 64, "KVM's layout");
static struct kvm_steal_time steal[MAX_CPUS];

/* The shared user page (read-only at CPL 3): the published word (round << 16 | the readers this round's
 * flush reached through the pv path, bit c), the stop flag, the round the writer is setting up (wp). */
struct shared {
	volatile u64 published;     /* 0 */
	volatile u64 stop;          /* 8 */
	volatile u64 changing;      /* 16 */
};
/* Each reader's user page (read-write at CPL 3; the assembly uses the offsets). */
struct ucpu {
	volatile u64 reads;         /* 0: loop iterations */
	volatile u64 stale_ipi;     /* 8: stale in a round whose flush was an IPI (or none) */
	volatile u64 stale_pv;      /* 16: stale in a round whose flush went through the steal-time record */
	u64 pad0[2];
	u64 cpu;                    /* 40 */
	u64 xva;                    /* 48: X for this phase */
	volatile u64 nrec;          /* 56 */
	struct {
		u64 published, seen; /* 64 + 16 i: the published word, the tag read (or the round being set up) */
	} rec[8];
} __attribute__((aligned(4096)));

extern char user_code[], user_read[], user_write[], wp_store[], wp_store_end[], user_leave[];
u32 enter_user(u64 rip, u64 rsp, u64 ucpu_va, u64 *resume, u64 *rsp0);

__asm__(
	"	.text\n"
	/* enter_user(rip, rsp, ucpu_va, &resume, &tss.rsp0): saves the callee-saved registers, records where a
	 * fault from user mode comes back to, points TSS.RSP0 below, IRETQ to CPL 3 with RBP = ucpu_va. Returns
	 * through user_leave (the fault handler's way back, RAX = 1). */
	"	.globl enter_user\n"
	"enter_user:\n"
	"	pushq %rbp\n	pushq %rbx\n	pushq %r12\n	pushq %r13\n	pushq %r14\n	pushq %r15\n"
	"	cli\n"
	"	movq %rsp, (%rcx)\n"
	"	leaq -1024(%rsp), %rax\n"
	"	movq %rax, (%r8)\n"
	"	movq %rdx, %rbp\n"
	"	pushq $0x2B\n"               /* SS */
	"	pushq %rsi\n"                /* RSP */
	"	pushq $0x202\n"              /* RFLAGS: IF */
	"	pushq $0x33\n"               /* CS */
	"	pushq %rdi\n"                /* RIP */
	"	iretq\n"
	"	.globl user_leave\n"
	"user_leave:\n"
	"	movl $1, %eax\n"
	"	popq %r15\n	popq %r14\n	popq %r13\n	popq %r12\n	popq %rbx\n	popq %rbp\n"
	"	ret\n"
	/* The user code, alone on its page (mapped at USER_VA; absolute addresses are user VAs). */
	"	.balign 4096\n"
	"	.globl user_code, user_read, user_write, wp_store, wp_store_end\n"
	"user_code:\n"
	/* remap and unmap: read the published word, then the tag through X; tag < round is stale. */
	"user_read:\n"
	"	movabsq $0x8000001000, %r12\n" /* SHARED_VA */
	"	movq 48(%rbp), %r13\n"       /* X */
	"	movq 40(%rbp), %rdi\n"
	"1:	movq (%r12), %rdx\n"
	"	movq (%r13), %rbx\n"
	"	movq %rdx, %rax\n"
	"	shrq $16, %rax\n"
	"	cmpq %rax, %rbx\n"
	"	jae 2f\n"
	"	btq %rdi, %rdx\n"
	"	jc 4f\n"
	"	incq 8(%rbp)\n"
	"	jmp 5f\n"
	"4:	incq 16(%rbp)\n"
	"5:	movq 56(%rbp), %rcx\n"
	"	cmpq $8, %rcx\n"
	"	jae 2f\n"
	"	incq 56(%rbp)\n"
	"	shlq $4, %rcx\n"
	"	movq %rdx, 64(%rbp,%rcx)\n"
	"	movq %rbx, 72(%rbp,%rcx)\n"
	"2:	incq (%rbp)\n"
	"	cmpq $0, 8(%r12)\n"
	"	je 1b\n"
	"	movabsq $0x8000002000, %rax\n" /* EXIT_VA: the fault takes the reader back to ring 0 */
	"	movq (%rax), %rax\n"
	"	ud2\n"
	/* wp: read the published word, write through X (a locked XCHG: done with the translation before the
	 * next load), read the round being set up. Odd round, no fault, and the writer still on that round:
	 * the write used a stale writable translation. The fault handler sets R14 and skips the XCHG. */
	"user_write:\n"
	"	movabsq $0x8000001000, %r12\n"
	"	movq 48(%rbp), %r13\n"
	"	movq 40(%rbp), %rdi\n"
	"	movq %rdi, %rsi\n"
	"	shlq $6, %rsi\n"
	"1:	movq (%r12), %rdx\n"
	"	xorl %r14d, %r14d\n"
	"	movq %rdx, %rbx\n"
	"wp_store:\n"
	"	xchgq %rbx, (%r13,%rsi)\n"
	"wp_store_end:\n"
	"	movq 16(%r12), %rcx\n"
	"	movq %rdx, %rax\n"
	"	shrq $16, %rax\n"
	"	testq %r14, %r14\n"
	"	jnz 2f\n"
	"	btq $0, %rax\n"
	"	jnc 2f\n"
	"	cmpq %rax, %rcx\n"
	"	jne 2f\n"
	"	btq %rdi, %rdx\n"
	"	jc 4f\n"
	"	incq 8(%rbp)\n"
	"	jmp 5f\n"
	"4:	incq 16(%rbp)\n"
	"5:	movq 56(%rbp), %rbx\n"
	"	cmpq $8, %rbx\n"
	"	jae 2f\n"
	"	incq 56(%rbp)\n"
	"	shlq $4, %rbx\n"
	"	movq %rdx, 64(%rbp,%rbx)\n"
	"	movq %rcx, 72(%rbp,%rbx)\n"
	"2:	incq (%rbp)\n"
	"	cmpq $0, 8(%r12)\n"
	"	je 1b\n"
	"	movabsq $0x8000002000, %rax\n"
	"	movq (%rax), %rax\n"
	"	ud2\n"
	"	.balign 4096\n");

_Static_assert(SHARED_VA == 0x8000001000ul && EXIT_VA == 0x8000002000ul,
	       "the user code's constants");

static u64 user_pdpt[512] __attribute__((aligned(4096)));
static u64 user_pd[512] __attribute__((aligned(4096)));
static volatile u64 user_pt[512] __attribute__((aligned(4096)));
static struct shared shared_page __attribute__((aligned(4096)));
static struct ucpu ucpu[MAX_CPUS] __attribute__((aligned(4096)));
static volatile u64 pool[POOL][512] __attribute__((aligned(4096)));
static volatile u64 wp_page[512] __attribute__((aligned(4096)));
extern u64 pml4[512];

enum kind { K_REMAP, K_UNMAP, K_WP, K_PTSWAP, K_LARGE };
enum flush { F_IPI, F_CR3, F_PV, F_NONE };
static const char *const kind_name[] = { "remap", "unmap", "wp", "ptswap", "large" };
static volatile u64 pt_pool[PT_POOL][512] __attribute__((aligned(4096)));
static volatile u64 x_va = X_VA;     /* this phase's X: the fault and flush handlers use it */
static const char *const flush_name[] = { "ipi", "cr3", "pv", "none" };

/* Per reader, kernel side. */
struct kcpu {
	volatile u64 resume, flush_req, flush_ack;
	volatile u32 faults_x, spurious, wp_faults, unexpected;
	u64 unexpected_vector, unexpected_rip, unexpected_cr2;
	volatile u32 left;
} __attribute__((aligned(64)));
static struct kcpu kcpu[MAX_CPUS];
static volatile u32 flush_kind;     /* F_IPI or F_CR3: what the IPI handler does */
static volatile u32 readers_done;
static u64 opt_ms, opt_verbose, opt_ad;
/* Every phase: the writer's reads of the readers' `preempted` bytes, and how many were non-zero. */
static u64 preempt_samples, preempt_nonzero;
static bool steal_ok;

struct phase_result {
	u64 rounds, pv_rounds, ipi_rounds, reads, stale_ipi, stale_pv, faults_x, spurious, ack_timeouts, ms;
	u64 flagged, flag_cleared, flag_kept, preempted_seen, unexpected;
	bool ran;
};

static u64 read_cr2(void)
{
	u64 v;
	__asm__ volatile("mov %%cr2, %0" : "=r"(v));
	return v;
}

static bool cmpxchg8(volatile u8 *p, u8 old, u8 new)
{
	u8 prev;
	__asm__ volatile("lock cmpxchgb %2, %1" : "=a"(prev), "+m"(*p) : "q"(new), "0"(old) : "memory");
	return prev == old;
}

static void clear_page_rep(volatile u64 *p)
{
	void *d = (void *)p;
	u64 n = 512;
	__asm__ volatile("rep stosq" : "+D"(d), "+c"(n) : "a"(0ul) : "memory");
}

static void invlpg(u64 va) { __asm__ volatile("invlpg (%0)" : : "r"(va) : "memory"); }
static void reload_cr3(void)
{
	u64 cr3;
	__asm__ volatile("mov %%cr3, %0; mov %0, %%cr3" : "=r"(cr3) : : "memory");
}

/* Back to enter_user's caller. */
static void leave_user(struct irq_frame *f, u32 c)
{
	f->rip = (u64)user_leave;
	f->cs = KCODE;
	f->ss = 0x10;
	f->rsp = kcpu[c].resume;
	f->rflags = 2;
}

static void page_fault(struct irq_frame *f, u32 c)
{
	u64 cr2 = read_cr2();
	struct kcpu *k = &kcpu[c];
	if ((f->cs & 3) == 3 && cr2 == EXIT_VA) {
		k->left++;
		leave_user(f, c);
		return;
	}
	if ((f->cs & 3) == 3 && cr2 >> 12 == x_va >> 12) {
		u64 pte = READ_ONCE(user_pt[X_PT]);
		k->faults_x++;
		if (f->rip == (u64)wp_store - (u64)user_code + USER_VA) {
			/* A write through X. The guest's PTE allows it now: a spurious fault (the PTE became writable
			 * and this CPU's translation was still the write-protected one, which x86 allows). */
			if ((pte & (PTE_P | PTE_W)) == (PTE_P | PTE_W))
				k->spurious++;
			k->wp_faults++;
			f->r14 = 1;
			f->rip = (u64)wp_store_end - (u64)user_code + USER_VA;
			return;
		}
		/* A read through X while it is not present (unmap): retried once the PTE is back. */
		if (pte & PTE_P)
			k->spurious++;
		return;
	}
	k->unexpected++;
	k->unexpected_vector = 14;
	k->unexpected_rip = f->rip;
	k->unexpected_cr2 = cr2;
	if ((f->cs & 3) == 3)
		leave_user(f, c);
	else
		panic("page fault in ring 0 on cpu %u at rip %lx cr2 %lx", c, f->rip, cr2);
}

static void other_fault(struct irq_frame *f, u32 c)
{
	struct kcpu *k = &kcpu[c];
	k->unexpected++;
	k->unexpected_vector = f->vector;
	k->unexpected_rip = f->rip;
	if ((f->cs & 3) == 3)
		leave_user(f, c);
	else
		panic("exception %lu in ring 0 on cpu %u at rip %lx", f->vector, c, f->rip);
}

/* The flush IPI: INVLPG X (or a CR3 reload), then the acknowledgement. */
static void flush_handler(struct irq_frame *f, u32 c)
{
	if (READ_ONCE(flush_kind) == F_CR3)
		reload_cr3();
	else
		invlpg(x_va);
	WRITE_ONCE(kcpu[c].flush_ack, READ_ONCE(kcpu[c].flush_req));
	apic_eoi();
}


/* Each CPU once: its TSS, and its steal-time record if the host has them. */
static volatile u32 steal_enabled;
static void cpu_setup(void *unused)
{
	u32 c = this_cpu();
	load_user_gdt(c);
	if (steal_ok && wrmsr_catch(MSR_KVM_STEAL_TIME, (u64)&steal[c] | 1) == 0)
		atomic_inc(&steal_enabled);
}

static u64 reader_rip;
static void reader(void *unused)
{
	u32 c = this_cpu();
	enter_user(reader_rip, CPU_VA(c) + 4096, CPU_VA(c), (u64 *)&kcpu[c].resume, (u64 *)(user_tss[c] + 4));
	atomic_inc(&readers_done);
}

static void sample_preempted(void)
{
	for (u32 c = 1; c < ncpus && steal_ok; c++) {
		preempt_samples++;
		preempt_nonzero += steal[c].preempted != 0;
	}
}

/* A user PTE; with ad=0 on the command line X's PTEs leave A and D clear (KVM then sets them itself, as it
 * does in Linux's fresh PTEs). */
static u64 pte_of(const volatile void *page, u64 flags) { return (u64)page | PTE_P | PTE_U | PTE_A | flags; }
static u64 x_pte(const volatile void *page, u64 flags)
{
	u64 pte = pte_of(page, flags);
	return opt_ad ? pte : pte & ~(PTE_A | PTE_D);
}

static void map_user_pages(void)
{
	user_pt[CODE_PT] = pte_of(user_code, 0);
	user_pt[SHARED_PT] = pte_of(&shared_page, 0);
	for (u32 c = 0; c < MAX_CPUS; c++)
		user_pt[CPU_PT + c] = pte_of(&ucpu[c], PTE_W | PTE_D);
	user_pd[0] = (u64)user_pt | PTE_P | PTE_W | PTE_U;
	user_pdpt[0] = (u64)user_pd | PTE_P | PTE_W | PTE_U;
	pml4[USER_VA >> 39] = (u64)user_pdpt | PTE_P | PTE_W | PTE_U;
	reload_cr3();
}

static bool readers_reading(void *unused)
{
	for (u32 c = 1; c < ncpus; c++)
		if (READ_ONCE(ucpu[c].reads) == 0 && kcpu[c].unexpected == 0)
			return false;
	return true;
}

/* The flush of round r: returns the readers reached through the pv path (bit c); the others got the IPI. */
static u64 flush_readers(enum flush fl, u64 r, struct phase_result *res, bool *pending_flag)
{
	u64 pv_mask = 0;
	if (fl == F_NONE)
		return 0;
	bool sent[MAX_CPUS] = { 0 };
	for (u32 c = 1; c < ncpus; c++) {
		if (fl == F_PV && steal_ok) {
			u8 s = steal[c].preempted;
			if (pending_flag[c]) {
				/* The byte a previous round set to PREEMPTED | FLUSH_TLB: has the host rewritten it? */
				if (s & KVM_VCPU_FLUSH_TLB)
					res->flag_kept++;
				else
					res->flag_cleared++;
				pending_flag[c] = false;
			}
			if (s & KVM_VCPU_PREEMPTED) {
				res->preempted_seen++;
				if (cmpxchg8(&steal[c].preempted, s, s | KVM_VCPU_FLUSH_TLB)) {
					res->flagged++;
					pending_flag[c] = true;
					pv_mask |= 1ul << c;
					continue;
				}
			}
		}
		WRITE_ONCE(kcpu[c].flush_req, r);
		sent[c] = apic_send_fixed(cpu_to_apic_id(c), V_FLUSH);
	}
	for (u32 c = 1; c < ncpus; c++) {
		if (pv_mask & (1ul << c))
			continue;
		if (!sent[c]) {
			res->ack_timeouts++;
			continue;
		}
		u64 t = rdtsc() + ms_to_tsc(WAIT_MS);
		while (READ_ONCE(kcpu[c].flush_ack) != r && rdtsc() < t)
			sample_preempted();
		if (READ_ONCE(kcpu[c].flush_ack) != r)
			res->ack_timeouts++;
	}
	if (pv_mask)
		res->pv_rounds++;
	else
		res->ipi_rounds++;
	return pv_mask;
}

static struct phase_result run_phase(enum kind kind, enum flush fl)
{
	struct phase_result res = { 0 };
	bool pending_flag[MAX_CPUS] = { 0 };
	/* Round 0: X maps pool page 0 (tag 0), or the wp page writable. */
	for (u32 i = 0; i < POOL; i++)
		pool[i][0] = 0;
	u64 first = kind == K_WP ? x_pte(wp_page, PTE_W | PTE_D) : x_pte(pool[0], 0);
	WRITE_ONCE(user_pt[X_PT], first);
	clear_page_rep(pt_pool[0]);
	pt_pool[0][0] = first;
	WRITE_ONCE(user_pd[X_PTSWAP_VA >> 21 & 511], (u64)pt_pool[0] | PTE_P | PTE_W | PTE_U | PTE_A);
	*(volatile u64 *)LARGE_BASE = 0;
	WRITE_ONCE(user_pd[X_LARGE_VA >> 21 & 511], x_pte((void *)LARGE_BASE, PDE_PS));
	x_va = kind == K_PTSWAP ? X_PTSWAP_VA : kind == K_LARGE ? X_LARGE_VA : X_VA;
	reload_cr3();
	shared_page.published = 0;
	shared_page.changing = 0;
	shared_page.stop = 0;
	for (u32 c = 1; c < ncpus; c++) {
		memset(&ucpu[c], 0, sizeof(ucpu[c]));
		ucpu[c].cpu = c;
		ucpu[c].xva = x_va;
		kcpu[c].faults_x = kcpu[c].spurious = kcpu[c].wp_faults = 0;
		kcpu[c].flush_ack = kcpu[c].flush_req = 0;
	}
	flush_kind = fl == F_CR3 ? F_CR3 : F_IPI;
	reader_rip = (u64)(kind == K_WP ? user_write : user_read) - (u64)user_code + USER_VA;
	readers_done = 0;
	bool started = true;
	for (u32 c = 1; c < ncpus; c++)
		started &= smp_call_async(c, reader, NULL);
	res.ran = started && wait_until(readers_reading, NULL, WAIT_MS);
	u64 t0 = rdtsc(), end = t0 + ms_to_tsc(opt_ms);
	u64 r = 0;
	while (res.ran && rdtsc() < end && res.ack_timeouts == 0) {
		r++;
		u64 mask = 0;
		if (kind == K_WP) {
			WRITE_ONCE(shared_page.changing, r);
			bool wp = r & 1;
			WRITE_ONCE(user_pt[X_PT], x_pte(wp_page, wp ? 0 : PTE_W | PTE_D));
			if (wp)
				mask = flush_readers(fl, r, &res, pending_flag);
		} else if (kind == K_PTSWAP) {
			/* A page-table page reused: cleared as Linux clears a new one (REP STOSQ), X's entry written
			 * while it is not linked, then linked in place of the old one. */
			volatile u64 *page = pool[r % POOL], *pt = pt_pool[r % PT_POOL];
			page[0] = r;
			clear_page_rep(pt);
			pt[0] = x_pte(page, 0);
			WRITE_ONCE(user_pd[X_PTSWAP_VA >> 21 & 511], (u64)pt | PTE_P | PTE_W | PTE_U | PTE_A);
			mask = flush_readers(fl, r, &res, pending_flag);
		} else if (kind == K_LARGE) {
			volatile u64 *page = (volatile u64 *)(LARGE_BASE + (r % LARGE_POOL) * (2ul << 20));
			page[0] = r;
			WRITE_ONCE(user_pd[X_LARGE_VA >> 21 & 511], x_pte(page, PDE_PS));
			mask = flush_readers(fl, r, &res, pending_flag);
		} else {
			volatile u64 *page = pool[r % POOL];
			page[0] = r;
			if (kind == K_UNMAP) {
				WRITE_ONCE(user_pt[X_PT], 0);
				mask = flush_readers(fl, r, &res, pending_flag);
				WRITE_ONCE(user_pt[X_PT], x_pte(page, 0));
			} else {
				WRITE_ONCE(user_pt[X_PT], x_pte(page, 0));
				mask = flush_readers(fl, r, &res, pending_flag);
			}
		}
		WRITE_ONCE(shared_page.published, r << 16 | mask);
		/* Let the readers read this round a while (the writer's own ring-0 code is slow anyway). */
		for (u32 i = 0; i < 4; i++)
			sample_preempted();
	}
	res.rounds = r;
	res.ms = (rdtsc() - t0) / tsc_khz();
	shared_page.stop = 1;
	bool back = wait_eq(&readers_done, ncpus - 1, WAIT_MS);
	for (u32 c = 1; c < ncpus; c++)
		smp_wait(c, WAIT_MS);
	res.ran &= back;
	for (u32 c = 1; c < ncpus; c++) {
		res.reads += ucpu[c].reads;
		res.stale_ipi += ucpu[c].stale_ipi;
		res.stale_pv += ucpu[c].stale_pv;
		res.faults_x += kcpu[c].faults_x;
		res.spurious += kcpu[c].spurious;
		res.unexpected += kcpu[c].unexpected;
		if (kcpu[c].unexpected)
			printf("INFO: cpu %u: %u unexpected faults, the last vector %lu at rip %lx (cr2 %lx)\n", c,
			       kcpu[c].unexpected, kcpu[c].unexpected_vector, kcpu[c].unexpected_rip,
			       kcpu[c].unexpected_cr2);
	}
	char phase[32];
	sfmt(phase, sizeof(phase), "%s-%s", kind_name[kind], flush_name[fl]);
	printf("COUNT: phase %s rounds=%lu ipi_rounds=%lu pv_rounds=%lu reads=%lu stale=%lu stale_pv=%lu "
	       "faults_x=%lu spurious=%lu ack_timeouts=%lu ms=%lu\n",
	       phase, res.rounds, res.ipi_rounds, res.pv_rounds, res.reads, res.stale_ipi + res.stale_pv,
	       res.stale_pv, res.faults_x, res.spurious, res.ack_timeouts, res.ms);
	if (fl == F_PV)
		printf("COUNT: phase %s preempted_seen=%lu flagged=%lu flag_cleared_later=%lu flag_still_set=%lu\n",
		       phase, res.preempted_seen, res.flagged, res.flag_cleared, res.flag_kept);
	for (u32 c = 1; c < ncpus; c++) {
		u64 n = ucpu[c].nrec < 8 ? ucpu[c].nrec : 8;
		for (u64 i = 0; i < n && (i < 3 || opt_verbose); i++)
			printf("TLB: %s stale on cpu %u: published round %lu (pv mask %lx), %s %lu\n", phase, c,
			       ucpu[c].rec[i].published >> 16, ucpu[c].rec[i].published & 0xFFFF,
			       kind == K_WP ? "writer on round" : "tag", ucpu[c].rec[i].seen);
	}
	return res;
}

void guest_main(void)
{
	opt_ms = cmdline_u64("ms", 300);
	opt_verbose = cmdline_u64("verbose", 0);
	opt_ad = cmdline_u64("ad", 1);
	platform_init(false);
	irq_set_handler(6, other_fault);
	irq_set_handler(13, other_fault);
	irq_set_handler(14, page_fault);
	irq_set_handler(V_FLUSH, flush_handler);
	map_user_pages();
	check(smp_start_all() == ncpus, "all cpus online", "not all APs came up");

	u32 a, b, cx, d, kvm_features = 0;
	cpuid(0x40000000, 0, &a, &b, &cx, &d);
	if (b == 0x4b4d564b && cx == 0x564b4d56 && d == 0x4d) /* "KVMKVMKVM\0\0\0" */
		cpuid(0x40000001, 0, &kvm_features, &b, &cx, &d);
	steal_ok = kvm_features & KVM_FEATURE_STEAL_TIME;
	for (u32 c = 1; c < ncpus; c++)
		smp_call(c, cpu_setup, NULL);
	cpu_setup(NULL);
	steal_ok = steal_ok && steal_enabled == ncpus;
	printf("INFO: %u cpus, %lu ms per phase; kvm features %x: steal time %s (enabled on %u cpus), "
	       "pv tlb flush %s\n",
	       ncpus, opt_ms, kvm_features, kvm_features & KVM_FEATURE_STEAL_TIME ? "offered" : "not offered",
	       steal_enabled, kvm_features & KVM_FEATURE_PV_TLB_FLUSH ? "offered" : "not offered");

	static const char *const others[] = {
		"readers ran in user mode in every phase",
		"every flush ipi was acknowledged",
		"no unexpected fault in user mode",
	};
	/* The phases; those with a check name must never be stale, the others print figures. */
	static const struct {
		enum kind kind;
		enum flush fl;
		const char *check;
	} phases[] = {
		{ K_REMAP, F_IPI, "no stale read after an invlpg ipi flush of a remapped pte" },
		{ K_REMAP, F_CR3, "no stale read after a cr3 reload ipi flush of a remapped pte" },
		{ K_UNMAP, F_IPI, "no stale read after an invlpg ipi flush of a cleared then set pte" },
		{ K_WP, F_IPI, "no write through a write-protected pte after an invlpg ipi flush" },
		{ K_PTSWAP, F_IPI, "no stale read after an invlpg ipi flush of a swapped page table" },
		{ K_LARGE, F_IPI, "no stale read after an invlpg ipi flush of a remapped 2 mib page" },
		{ K_REMAP, F_PV, NULL },
		{ K_WP, F_PV, NULL },
		{ K_REMAP, F_NONE, NULL },
		{ K_UNMAP, F_NONE, NULL },
		{ K_WP, F_NONE, NULL },
		{ K_PTSWAP, F_NONE, NULL },
		{ K_LARGE, F_NONE, NULL },
	};
	const u32 n_phases = sizeof(phases) / sizeof(phases[0]);
	if (ncpus < 2) {
		for (u32 i = 0; i < n_phases; i++)
			if (phases[i].check)
				skip(phases[i].check, "needs 2 CPUs, has %u", ncpus);
		for (u32 i = 0; i < sizeof(others) / sizeof(others[0]); i++)
			skip(others[i], "needs 2 CPUs, has %u", ncpus);
		return;
	}
	struct phase_result res[sizeof(phases) / sizeof(phases[0])];
	bool all_ran = true;
	u64 timeouts = 0, unexpected = 0, pv_stale = 0, pv_rounds = 0;
	for (u32 i = 0; i < n_phases; i++) {
		res[i] = run_phase(phases[i].kind, phases[i].fl);
		all_ran &= res[i].ran && res[i].rounds > 0;
		timeouts += res[i].ack_timeouts;
		unexpected += res[i].unexpected;
		if (phases[i].fl == F_PV) {
			pv_stale += res[i].stale_pv;
			pv_rounds += res[i].pv_rounds;
		}
	}
	for (u32 i = 0; i < n_phases; i++)
		if (phases[i].check)
			check(res[i].stale_ipi + res[i].stale_pv == 0, phases[i].check, "%lu stale in %lu rounds",
			      res[i].stale_ipi + res[i].stale_pv, res[i].rounds);
	check(all_ran, others[0], "a phase did not start or end");
	check(timeouts == 0, others[1], "%lu timed out", timeouts);
	check(unexpected == 0, others[2], "%lu", unexpected);
	for (u32 c = 0; c < ncpus && steal_ok; c++)
		printf("INFO: cpu %u steal-time record: steal %lu ns, version %u, flags %x, preempted %x\n", c,
		       steal[c].steal, steal[c].version, steal[c].flags, steal[c].preempted);
	/* Does the host rewrite the record's `preempted` byte at a vCPU's entry (KVM's record_steal_time: an
	 * XCHG with 0, and a TLB flush if FLUSH_TLB was set)? The readers are idle in HLT now: the byte is set to
	 * FLUSH_TLB and the reader woken with the flush IPI (its thread sleeps and wakes, so KVM loads it again). */
	for (u32 c = 1; c < ncpus && steal_ok; c++) {
		steal[c].preempted = KVM_VCPU_FLUSH_TLB;
		u32 v0 = steal[c].version;
		kcpu[c].flush_req = ~0ul;
		apic_send_fixed(cpu_to_apic_id(c), V_FLUSH);
		u64 t = rdtsc() + ms_to_tsc(200);
		while ((steal[c].preempted != 0 || steal[c].version == v0) && rdtsc() < t)
			cpu_relax();
		printf("INFO: cpu %u: preempted byte set to FLUSH_TLB by the guest reads %x after a wake-up (record "
		       "version %u -> %u)\n",
		       c, steal[c].preempted, v0, steal[c].version);
	}
	printf("INFO: the readers' preempted bytes: %lu of %lu reads by the writer non-zero\n", preempt_nonzero,
	       preempt_samples);
	printf("INFO: pv path: %lu rounds flushed at least one reader through its steal-time record, %lu stale reads "
	       "in them\n",
	       pv_rounds, pv_stale);
	if (pv_stale)
		printf("HOST-BUG pv-tlb-flush stale=%lu\n", pv_stale);
}
