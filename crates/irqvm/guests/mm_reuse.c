/* mm_reuse: user processes with address spaces of their own on every CPU, whose page-table and data pages are
 * freed and reused across CPUs, checking that every user-mode read returns the words last written at that
 * address (SDM vol. 3 4.10, "Caching Translation Information"; 4.10.4, "Invalidation of TLBs and
 * Paging-Structure Caches").
 *
 * Why: a 2-vCPU Linux guest on this host (kvm_pvm, whose user mode runs natively on shadow page tables) has
 * user-mode loads that read another physical page than the one the guest maps (docs/kvm-facts.md, "User-mode
 * reads through a page the guest does not map"). irqvm takes part in every Linux system call there
 * (emulate/syscall.rs: a breakpoint at the page-fault handler, KVM_SET_SREGS at each SYSCALL), so this guest
 * does what Linux's processes do to the MMU, without Linux, in two ways of entering the kernel:
 * - syscall=1 (the default): SYSCALL, so irqvm's SYSCALL watch is armed (LSTAR is written) and every page
 *   fault and system call passes through irqvm, as under Linux;
 * - syscall=0: no SYSCALL and no LSTAR write, so the watch is never armed; user mode asks for the kernel
 *   with a read of an unmapped address (the end of a quantum) or UD2 (a round trip). On this host nothing in
 *   irqvm then takes part in the paging at all.
 *
 * The kernel: a pool of pages (a LIFO free list shared by all CPUs, so a page one CPU frees is the next one
 * another CPU allocates) gives both page-table pages (zeroed when allocated, as Linux's are) and data pages.
 * `procs` process slots (default 3 per CPU) each hold a process with a PML4 of its own (the kernel's identity
 * map in slot 0) and its user space in slot 1, built lazily: the code page (shared, read-only), a state page
 * (the tag of each data page, the user stack), and `nv` data pages spread over two page directories and four
 * page tables. A CPU takes any process no other CPU has (so processes move between CPUs), loads its CR3, runs
 * one quantum in user mode, and keeps that CR3 loaded afterwards (a lazy address space, as Linux's kernel
 * threads and idle loop keep the last process's). After the quantum, at random, what Linux does to a running
 * process's memory:
 * - unmap a data page (INVLPG), and its page table once that is empty (as free_pgtables does);
 * - move a data page to a new physical page with the same words (INVLPG), as compaction does;
 * - fork: a free slot gets a child whose data pages are the parent's, read-only in both (the parent's PTEs
 *   write-protected and INVLPG'd); a write to such a page then takes a copy-on-write fault (a private copy,
 *   or the page made writable again once nobody else maps it);
 * - and after `life` quanta, exec (the new address space built and its first two data pages written by the
 *   kernel and mapped while the old one is loaded, CR3 switched, then the old one freed, as Linux's exec
 *   does; the new image runs on whichever CPU takes it next) or exit. Before an address space's pages go back
 *   to the pool, every other CPU that still has it loaded lazily gets an IPI and loads the kernel's CR3.
 * A demand fault on a data page maps a page from the pool that the kernel has filled with a new tag (through
 * its identity map), and records the tag in the state page; the last `files` data pages of every process are
 * instead the page cache's, mapped read-only and shared by every process until a write copies them.
 *
 * The user code, one quantum: for each data page, touch it, read its tag from the state page, read all 512
 * words `reps` times, each must equal the tag; every other visit it writes a new tag to all 512 words and
 * then to the state page; after each page a round trip to the kernel (SYSCALL/SYSRETQ, or UD2 and IRETQ). A
 * word that differs is counted in the state page with the first one's address and values. The kernel checks
 * sampled words of each page through its identity map before it frees or moves it (a user write that went
 * through a stale translation leaves the page without its tag), and for a bad user read finds which pool page
 * holds the value that was read at that offset (freed, another process's, a page table). Each CPU's LAPIC
 * timer interrupts user mode every `tick_us`; an IPI to the neighbour every 16 quanta; a HLT every 32.
 * Command line: syscall=1|0, lazy=1|0 (keep the last process's CR3 after a quantum; default 1), bulk=0|1|2 (how
 * the kernel clears and copies pages, default 0), zap=1|0 (clear an address space's entries before freeing its
 * pages, default 1), spread=1|0 (a page table per data page, default 1), pge=1|0 (global kernel pages, default
 * 1), quanta=N (the work per CPU, default 30), ms=N (a bound per CPU, default 15000: the run normally ends by
 * the quanta; the bound only ends a starved, hung or slowed one, whose every CPU must still have made a third
 * of them or a third of the busiest CPU's count), procs=N
 * (up to 512), pool_mb=N (the page pool in N MiB of RAM above the image instead of the image's 8 MiB; up to
 * 128), remote=N (after one in N quanta, migrate a page of a process another CPU is running; default 0,
 * never), nv=N (data pages per process, default 8, up to 64), files=N (file-backed ones among them, default 2,
 * up to 8), life=N (quanta
 * per process, default 6), reps=N (default 4), tick_us=N (default 1000), seed=N, verbose=1 (the first bad
 * reads with the pool pages that hold the value read). */
#include "usermode.h"

#define MSR_EFER 0xC0000080
#define MSR_STAR 0xC0000081
#define MSR_LSTAR 0xC0000082
#define MSR_SFMASK 0xC0000084
#define MSR_GS_BASE 0xC0000101
#define EFER_SCE 1ul
#define SFMASK 0x47700ul            /* Linux's: TF, DF, IF, IOPL, NT, AC */

#define PTE_P 1ul
#define PTE_W 2ul
#define PTE_U 4ul
#define PTE_ADDR 0x000FFFFFFFFFF000ul

/* User space, in PML4 slot 1: data page v at data_va(v); with `spread=0`, PDPT slot v & 1, page-directory slot
 * (v >> 1) & 1, page-table slot v >> 2 (two page directories, four page tables); with `spread=1` (the default)
 * PDPT slot v & 3 and page-directory slot v >> 2, so each data page has a page table of its own and each
 * process needs four page directories (more paging-structure pages than the host's shadow MMU keeps for a
 * small guest: it recycles them). The code page and the state page in PDPT slot 8; PDPT slot 9 is never
 * mapped (the fault entry's address). */
#define USER_VA 0x8000000000ul
#define MAX_NV 64
#define CODE_VA (USER_VA + (8ul << 30))
#define STATE_VA (CODE_VA + 4096)
#define MAGIC_VA (USER_VA + (9ul << 30))

/* The state page, in words: the tag of each data page (0: not mapped), then what the kernel tells the user
 * code and what the user code reports; the user stack grows down from the page's end. */
#define ST_NV 64
#define ST_REPS 65
#define ST_ROUND 66
#define ST_SYSCALL 67               /* 1: SYSCALL entries, 0: fault entries */
#define ST_BAD 68                   /* words that differed */
#define ST_BAD_VA 69                /* the first one: its address, the tag, the word read */
#define ST_BAD_EXP 70
#define ST_BAD_SEEN 71
#define ST_TRIPS 72                 /* round trips that returned the kernel's answer */
#define ST_VA 128                   /* 128..191: data_va(v), for the user code */

#define QUIT_DONE 0                 /* the user code's quantum is over */
#define TRIP_ANSWER 0x5A5Aul        /* what a round trip returns in RAX */

#define V_TICK 0x40
#define V_IPI 0x41
#define V_LEAVE 0x42
#define V_FLUSH 0x43                /* `remote=`: INVLPG flush_va[cpu] and acknowledge */

/* The per-CPU area at IA32_GS_BASE (in user mode too: the user code never uses GS, so no SWAPGS). */
struct pcpu {
	u64 self;                   /* 0 */
	u64 user_rsp;               /* 8: saved by the SYSCALL round trip */
	u64 kstack;                 /* 16: its stack */
	u64 resume_rsp;             /* 24: enter_user's frame, where a quantum's end goes back to */
	u64 tss;                    /* 32 */
	u64 pad[3];
} __attribute__((aligned(64)));
_Static_assert(sizeof(struct pcpu) == 64, "the assembly's offsets");
static struct pcpu pcpu[MAX_CPUS];

extern char user_code[], user_code_end[], sc_entry[], quantum_leave[];
u64 enter_user(u64 rip, u64 rsp, u64 rflags);

__asm__(
	"	.text\n"
	/* enter_user(rip, rsp, rflags): saves the callee-saved registers, records where a quantum's end comes
	 * back to, points TSS.RSP0 and the round trip's stack below them, and IRETQs to CPL 3. Returns the
	 * user code's RAX at its last entry (QUIT_DONE) or what a fault handler put there. */
	"	.globl enter_user\n"
	"enter_user:\n"
	"	pushq %rbp\n	pushq %rbx\n	pushq %r12\n	pushq %r13\n	pushq %r14\n	pushq %r15\n"
	"	cli\n"
	"	movq %rsp, %gs:24\n"
	"	leaq -256(%rsp), %rax\n"
	"	movq %rax, %gs:16\n"
	"	leaq -1024(%rsp), %rax\n"
	"	movq %gs:32, %rcx\n"
	"	movq %rax, 4(%rcx)\n"        /* TSS.RSP0 (SDM vol. 3 8.7) */
	"	pushq $0x2B\n"               /* SS */
	"	pushq %rsi\n"                /* RSP */
	"	pushq %rdx\n"                /* RFLAGS */
	"	pushq $0x33\n"               /* CS */
	"	pushq %rdi\n"                /* RIP */
	"	iretq\n"
	/* A quantum's end, from the SYSCALL entry or from a fault handler's frame: back to enter_user's caller
	 * with RAX as it is. */
	"	.globl quantum_leave\n"
	"quantum_leave:\n"
	"	movq %gs:24, %rsp\n"
	"	popq %r15\n	popq %r14\n	popq %r13\n	popq %r12\n	popq %rbx\n	popq %rbp\n"
	"	ret\n"
	/* The handler at LSTAR: RAX = 1 is a round trip (answer in RAX, SYSRETQ), anything else ends the
	 * quantum. */
	"	.balign 16\n"
	"	.globl sc_entry\n"
	"sc_entry:\n"
	"	cmpq $1, %rax\n"
	"	jne quantum_leave\n"
	"	movq %rsp, %gs:8\n"
	"	movq %gs:16, %rsp\n"
	"	movl $0x5A5A, %eax\n"
	"	movq %gs:8, %rsp\n"
	"	sysretq\n"
	/* The user code, alone on its page (mapped at CODE_VA), position independent. Registers: RBX the state
	 * page, R12 the data page count, R13 the page index, R15 its address, R14 the rep count left, RCX the
	 * tag, RDX the word index. */
	"	.balign 4096\n"
	"	.globl user_code, user_code_end\n"
	"user_code:\n"
	"	movabsq $0x8200001000, %rbx\n"  /* STATE_VA */
	"	movq 512(%rbx), %r12\n"      /* ST_NV */
	"	xorl %r13d, %r13d\n"
	"1:	cmpq %r12, %r13\n"
	"	jae 9f\n"
	"	movq 1024(%rbx,%r13,8), %r15\n" /* ST_VA: data_va(v) */
	"	movq (%r15), %rax\n"         /* the touch: a demand fault maps and tags the page */
	"	movq (%rbx,%r13,8), %rcx\n"  /* its tag, read after the touch */
	"	movq 520(%rbx), %r14\n"      /* ST_REPS */
	"2:	xorl %edx, %edx\n"
	"3:	movq (%r15,%rdx,8), %rax\n"
	"	cmpq %rax, %rcx\n"
	"	jne 20f\n"
	"4:	incl %edx\n"
	"	cmpl $512, %edx\n"
	"	jb 3b\n"
	"	decq %r14\n"
	"	jnz 2b\n"
	/* Every other visit (by round and page) a new tag, written to every word and then to the state page. */
	"	movq 528(%rbx), %rax\n"      /* ST_ROUND */
	"	addq %r13, %rax\n"
	"	testq $1, %rax\n"
	"	jz 6f\n"
	"	addq $1, %rcx\n"
	"	xorl %edx, %edx\n"
	"5:	movq %rcx, (%r15,%rdx,8)\n"
	"	incl %edx\n"
	"	cmpl $512, %edx\n"
	"	jb 5b\n"
	"	movq %rcx, (%rbx,%r13,8)\n"
	/* A round trip to the kernel. */
	"6:	movl $1, %eax\n"
	"	cmpq $0, 536(%rbx)\n"        /* ST_SYSCALL */
	"	je 7f\n"
	"	syscall\n"
	"	jmp 8f\n"
	"7:	ud2\n"
	"8:	cmpq $0x5A5A, %rax\n"
	"	jne 10f\n"
	"	incq 576(%rbx)\n"            /* ST_TRIPS */
	"10:	incq %r13\n"
	"	jmp 1b\n"
	/* The quantum's end. */
	"9:	movl $0, %eax\n"            /* QUIT_DONE */
	"	cmpq $0, 536(%rbx)\n"
	"	je 11f\n"
	"	syscall\n"
	"11:	movabsq $0x8240000000, %rcx\n" /* MAGIC_VA */
	"	movq (%rcx), %rcx\n"
	"	ud2\n"
	/* A word that differs: counted, the first one recorded; the check goes on. */
	"20:	cmpq $0, 544(%rbx)\n"       /* ST_BAD */
	"	jne 21f\n"
	"	leaq (%r15,%rdx,8), %rsi\n"
	"	movq %rsi, 552(%rbx)\n"
	"	movq %rcx, 560(%rbx)\n"
	"	movq %rax, 568(%rbx)\n"
	"21:	incq 544(%rbx)\n"
	"	jmp 4b\n"
	"user_code_end:\n"
	"	.balign 4096\n");
_Static_assert(STATE_VA == 0x8200001000ul && MAGIC_VA == 0x8240000000ul, "the user code's constants");
_Static_assert(ST_NV * 8 == 512 && ST_REPS * 8 == 520 && ST_ROUND * 8 == 528 && ST_SYSCALL * 8 == 536 &&
		       ST_BAD * 8 == 544 && ST_BAD_VA * 8 == 552 && ST_BAD_EXP * 8 == 560 && ST_BAD_SEEN * 8 == 568 &&
		       ST_TRIPS * 8 == 576 && ST_VA * 8 == 1024,
	       "the user code's offsets");

extern u64 pml4[512];

/* ---- the page pool --------------------------------------------------------------------------------------- */
/* The pool is the image's own 8 MiB (POOL_PAGES) unless `pool_mb=N` asks for N MiB of RAM above the image (up
 * to MAX_POOL pages, as much as fw_cfg says the RAM holds), a page cache the size of a small Linux guest's. */
#define POOL_PAGES 2048
#define MAX_POOL 32768
enum role { ROLE_FREE, ROLE_TABLE, ROLE_DATA };
static u64 image_pool[POOL_PAGES][512] __attribute__((aligned(4096)));
static u64 (*pool)[512] = image_pool;
static u32 pool_pages = POOL_PAGES;
static u32 free_list[MAX_POOL];
static u32 free_top;
static spinlock_t pool_lock;
static u8 page_role[MAX_POOL], page_last_use[MAX_POOL];
static u32 page_owner[MAX_POOL];        /* the process generation that has it (data and tables) */
static u8 page_vpage[MAX_POOL];         /* a data page's index in its process */
static u16 page_refs[MAX_POOL];         /* page tables that map it (data pages shared after a fork) */
extern char __image_end[];              /* link.ld */

static u32 pool_index(u64 pa) { return (u32)((pa - (u64)pool) / 4096); }

/* How the kernel writes whole pages (`bulk=`): 0 (the default) REP STOSQ / REP MOVSQ (Linux's clear_page_rep and
 * copy_page with REP_GOOD), 1 REP STOSB / REP MOVSB (clear_page_erms and the ERMS copies Linux uses on this
 * host's CPU; a tag is spread by an overlapping forward REP MOVSB), 2 one MOV per word (clear_page_orig). A
 * host's emulator may take a REP string instruction as one large write, which a shadow MMU must see as 512
 * paging entries changed. */
static u64 opt_bulk, opt_files, opt_nv;

static void fill_page(u64 *page, u64 value)
{
	u64 n;
	switch (opt_bulk) {
	case 1:
		if (value == 0) {
			n = 4096;
			__asm__ volatile("rep stosb" : "+D"(page), "+c"(n) : "a"(0) : "memory");
			break;
		}
		page[0] = value;
		n = 4096 - 8;
		const u64 *from = page;
		u64 *to = page + 1;
		__asm__ volatile("rep movsb" : "+D"(to), "+S"(from), "+c"(n) : : "memory");
		break;
	case 2:
		for (u32 i = 0; i < 512; i++)
			WRITE_ONCE(page[i], value);
		break;
	default:
		n = 512;
		__asm__ volatile("rep stosq" : "+D"(page), "+c"(n) : "a"(value) : "memory");
	}
}

static void copy_page(u64 *to, const u64 *from)
{
	u64 n;
	switch (opt_bulk) {
	case 1:
		n = 4096;
		__asm__ volatile("rep movsb" : "+D"(to), "+S"(from), "+c"(n) : : "memory");
		break;
	case 2:
		for (u32 i = 0; i < 512; i++)
			WRITE_ONCE(to[i], READ_ONCE(from[i]));
		break;
	default:
		n = 512;
		__asm__ volatile("rep movsq" : "+D"(to), "+S"(from), "+c"(n) : : "memory");
	}
}

struct cpu_stats;
static u64 *alloc_page(struct cpu_stats *s, enum role role, u32 owner, u32 vpage);
static void free_page(u64 pa);

/* ---- processes ------------------------------------------------------------------------------------------- */
#define MAX_PROCS 512
#define MAX_TABLES 80
#define DATA_RW (PTE_P | PTE_W | PTE_U)
#define DATA_RO (PTE_P | PTE_U)     /* shared after a fork until a write copies it */
struct proc {
	volatile u32 busy;          /* a CPU runs it or changes it (taken with xchg) */
	u32 gen;                    /* this incarnation; 0: the slot is empty */
	u32 quanta;                 /* run so far */
	u32 last_cpu;               /* 1 + the CPU that ran it last */
	u64 *pml4;
	u64 *tables[MAX_TABLES];    /* every paging-structure page below the PML4 */
	u32 ntables;
	u64 *state;                 /* the state page (through the identity map) */
	u64 *data[MAX_NV];          /* data page v, or NULL */
	spinlock_t mlock;           /* `remote=`: held by a CPU migrating one of its pages while it runs elsewhere */
	volatile u32 migrating;     /* 1 + the data page being migrated (its PTE not present meanwhile), or 0 */
} __attribute__((aligned(64)));
static struct proc procs[MAX_PROCS];
static volatile u32 next_gen = 1;

struct cpu_stats {
	u64 quanta, created, forks, execs, exited, file_maps, demand_faults, unmaps, moves, cow_copies, cow_reuses;
	u64 tables_freed;
	u64 remote_moves, remote_flush_timeouts, migration_retries;
	u64 trips, migrations, leave_ipis, leave_timeouts;
	u64 user_bad, kernel_bad, role_to_table, role_to_data, empty_pool;
	u64 bad_va, bad_exp, bad_seen, bad_pa, bad_quantum;
	u32 bad_gen, printed;
	u64 kbad_pa, kbad_exp, kbad_seen;
	u32 faulted;
	u64 fault_vector, fault_rip, fault_cs, fault_error, fault_cr2;
	u64 ms, rng;
} __attribute__((aligned(64)));
static struct cpu_stats stats[MAX_CPUS];
static volatile u32 workers_done;
static volatile struct proc *running[MAX_CPUS];
/* Lazy address spaces, as Linux keeps the last process's CR3 while the CPU runs the kernel: what each CPU has
 * loaded, whether that is a process it no longer runs, and the acknowledgements of V_LEAVE, which makes a
 * lazy CPU load the kernel's own CR3 before an exiting process's page tables go back to the pool. */
static volatile u64 loaded_cr3[MAX_CPUS];
static volatile u32 lazy[MAX_CPUS], leave_acks[MAX_CPUS];
static u64 opt_pool_mb;
static u64 opt_ms, opt_quanta, opt_procs, opt_life, opt_reps, opt_tick_us, opt_seed, opt_verbose;
static u64 opt_remote;
static bool opt_syscall, opt_lazy, opt_zap, opt_spread, opt_pge;

static u64 data_va(u32 v)
{
	if (opt_spread)
		return USER_VA + ((u64)(v & 3) << 30) + ((u64)(v >> 2) << 21);
	return USER_VA + ((u64)(v & 1) << 30) + ((u64)((v >> 1) & 1) << 21) + ((u64)(v >> 2) << 12);
}

static u64 rng_next(struct cpu_stats *s)
{
	s->rng ^= s->rng << 13;
	s->rng ^= s->rng >> 7;
	s->rng ^= s->rng << 17;
	return s->rng;
}

static u64 *alloc_page(struct cpu_stats *s, enum role role, u32 owner, u32 vpage)
{
	spin_lock(&pool_lock);
	if (free_top == 0) {
		spin_unlock(&pool_lock);
		s->empty_pool++;
		return NULL;
	}
	u32 i = free_list[--free_top];
	spin_unlock(&pool_lock);
	if (page_last_use[i] == ROLE_DATA && role == ROLE_TABLE)
		s->role_to_table++;
	if (page_last_use[i] == ROLE_TABLE && role == ROLE_DATA)
		s->role_to_data++;
	page_role[i] = (u8)role;
	page_last_use[i] = (u8)role;
	page_owner[i] = owner;
	page_vpage[i] = (u8)vpage;
	page_refs[i] = 1;
	if (role == ROLE_TABLE)
		fill_page(pool[i], 0);
	return pool[i];
}

static void free_page(u64 pa)
{
	u32 i = pool_index(pa);
	page_role[i] = ROLE_FREE;
	spin_lock(&pool_lock);
	free_list[free_top++] = i;
	spin_unlock(&pool_lock);
}

/* A data page gets one more mapping (a fork) or loses one; the last one frees it. */
static void get_page(u64 *page)
{
	spin_lock(&pool_lock);
	page_refs[pool_index((u64)page)]++;
	spin_unlock(&pool_lock);
}

static void put_page(u64 *page)
{
	spin_lock(&pool_lock);
	u32 left = --page_refs[pool_index((u64)page)];
	spin_unlock(&pool_lock);
	if (left == 0)
		free_page((u64)page);
}

static u32 page_ref_count(u64 *page)
{
	spin_lock(&pool_lock);
	u32 n = page_refs[pool_index((u64)page)];
	spin_unlock(&pool_lock);
	return n;
}

static u64 read_cr2(void)
{
	u64 v;
	__asm__ volatile("mov %%cr2, %0" : "=r"(v));
	return v;
}

static u64 read_cr3(void)
{
	u64 v;
	__asm__ volatile("mov %%cr3, %0" : "=r"(v));
	return v;
}

static void write_cr3(u64 v) { __asm__ volatile("mov %0, %%cr3" : : "r"(v) : "memory"); }
static void invlpg(u64 va) { __asm__ volatile("invlpg (%0)" : : "r"(va) : "memory"); }

/* CPU c loads `cr3` (MOV to CR3 flushes its non-global translations, SDM vol. 3 4.10.4.1), with interrupts
 * off so that V_LEAVE sees `lazy` and CR3 agree. */
static void switch_cr3(u32 c, u64 cr3, bool now_lazy)
{
	u64 flags = read_flags();
	cli();
	write_cr3(cr3);
	loaded_cr3[c] = cr3;
	lazy[c] = now_lazy;
	write_flags(flags);
}

/* The entry for `va` at paging level `level` (3: PDPT, 2: PD, 1: PT) of `p`, allocating the tables on the
 * way (user, writable: the leaf decides). NULL if it is not there and `alloc` is false or the pool is empty. */
static u64 *walk(struct cpu_stats *s, struct proc *p, u64 va, u32 level, bool alloc)
{
	u64 *table = p->pml4;
	for (u32 l = 4; l > level; l--) {
		u64 *e = &table[(va >> (12 + 9 * (l - 1))) & 511];
		if (!(*e & PTE_P)) {
			if (!alloc || p->ntables == MAX_TABLES)
				return NULL;
			u64 *t = alloc_page(s, ROLE_TABLE, p->gen, 0);
			if (!t)
				return NULL;
			p->tables[p->ntables++] = t;
			WRITE_ONCE(*e, (u64)t | PTE_P | PTE_W | PTE_U);
		}
		table = (u64 *)(*e & PTE_ADDR);
	}
	return &table[(va >> (12 + 9 * (level - 1))) & 511];
}

static bool map_page(struct cpu_stats *s, struct proc *p, u64 va, u64 *page, u64 flags)
{
	u64 *pte = walk(s, p, va, 1, true);
	if (!pte)
		return false;
	WRITE_ONCE(*pte, (u64)page | flags);
	return true;
}

/* Data page v of `p` gets a new page from the pool, filled with a new tag that the state page records (a
 * demand fault, or what exec writes into a new process before it runs). */
/* The page cache: `files` pages the kernel filled once, which the last data pages of every process map
 * read-only at their first touch (a file's private mapping: shared by every process until one writes, which
 * copies). The cache's own reference keeps them. */
#define MAX_FILES 8
static u64 *file_page[MAX_FILES];
static u64 file_tag(u32 f) { return 0xF11Eul << 48 | (u64)f << 24; }

static bool is_file_backed(u32 v) { return v + opt_files >= opt_nv; }

static bool fill_page_cache(void)
{
	for (u32 f = 0; f < opt_files; f++) {
		file_page[f] = alloc_page(&stats[0], ROLE_DATA, 0, f);
		if (!file_page[f])
			return false;
		fill_page(file_page[f], file_tag(f));
	}
	return true;
}

static bool map_file_page(struct cpu_stats *s, struct proc *p, u32 v)
{
	u32 f = v + opt_files - opt_nv;
	if (!map_page(s, p, data_va(v), file_page[f], DATA_RO))
		return false;
	get_page(file_page[f]);
	p->state[v] = file_tag(f);
	p->data[v] = file_page[f];
	s->file_maps++;
	return true;
}

static bool map_new_data(struct cpu_stats *s, struct proc *p, u32 v)
{
	if (is_file_backed(v))
		return map_file_page(s, p, v);
	u64 tag = (u64)p->gen << 32 | (u64)v << 24 | (rng_next(s) & 0xFFF000);
	u64 *page = alloc_page(s, ROLE_DATA, p->gen, v);
	if (!page)
		return false;
	fill_page(page, tag);
	p->state[v] = tag;
	if (!map_page(s, p, data_va(v), page, DATA_RW)) {
		free_page((u64)page);
		return false;
	}
	p->data[v] = page;
	return true;
}

/* A new process in slot `p` (its `busy` held): a PML4 with the kernel's identity map, the code page and a
 * state page, a copy of `parent`'s or zeroed; without a parent, its first two data pages mapped and tagged
 * while another address space is loaded (exec). */
static bool create_proc(struct cpu_stats *s, struct proc *p, struct proc *parent)
{
	p->gen = atomic_fetch_add(&next_gen, 1);
	p->quanta = 0;
	p->last_cpu = 0;
	p->ntables = 0;
	memset(p->data, 0, sizeof(p->data));
	p->pml4 = alloc_page(s, ROLE_TABLE, p->gen, 0);
	p->state = alloc_page(s, ROLE_DATA, p->gen, 0xFF);
	if (!p->pml4 || !p->state)
		return false;
	if (parent)
		copy_page(p->state, parent->state);
	else
		fill_page(p->state, 0);
	p->pml4[0] = pml4[0];
	if (!map_page(s, p, CODE_VA, (u64 *)user_code, PTE_P | PTE_U) ||
	    !map_page(s, p, STATE_VA, p->state, PTE_P | PTE_W | PTE_U))
		return false;
	if (!parent)
		for (u32 v = 0; v < 2 && v < opt_nv; v++)
			if (!map_new_data(s, p, v))
				return false;
	s->created++;
	return true;
}

/* Sampled words of data page v must hold the tag the state page has for it. */
static void check_page(struct cpu_stats *s, struct proc *p, u32 v)
{
	u64 *page = p->data[v], tag = p->state[v];
	static const u32 words[] = { 0, 1, 255, 256, 511 };
	for (u32 k = 0; k < sizeof(words) / sizeof(words[0]); k++) {
		u64 seen = page[(words[k] + 37 * v) & 511];
		if (seen != tag && s->kernel_bad++ == 0) {
			s->kbad_pa = (u64)page;
			s->kbad_exp = tag;
			s->kbad_seen = seen;
		}
	}
}

/* Unmaps data page v (INVLPG: the process runs here), and its page table once that has no entry left. */
static void unmap_data(struct cpu_stats *s, struct proc *p, u32 v)
{
	u64 va = data_va(v), *pte = walk(s, p, va, 1, false);
	check_page(s, p, v);
	WRITE_ONCE(*pte, 0);
	invlpg(va);
	put_page(p->data[v]);
	p->data[v] = NULL;
	p->state[v] = 0;
	s->unmaps++;
	u64 *pt = (u64 *)((u64)pte & ~4095ul);
	for (u32 i = 0; i < 512; i++)
		if (pt[i])
			return;
	u64 *pde = walk(s, p, va, 2, false);
	WRITE_ONCE(*pde, 0);
	invlpg(va); /* also drops paging-structure caches (SDM vol. 3 4.10.4.1, INVLPG) */
	for (u32 t = 0; t < p->ntables; t++)
		if (p->tables[t] == pt) {
			p->tables[t] = p->tables[--p->ntables];
			break;
		}
	free_page((u64)pt);
	s->tables_freed++;
}

/* Data page v (writable, not shared) moves to a new page with the same words, INVLPG (what compaction or a
 * NUMA move does to a running process). */
static void move_data(struct cpu_stats *s, struct proc *p, u32 v)
{
	u64 va = data_va(v), *pte = walk(s, p, va, 1, false);
	if (!(*pte & PTE_W) || page_ref_count(p->data[v]) != 1)
		return;
	u64 *to = alloc_page(s, ROLE_DATA, p->gen, v);
	if (!to)
		return;
	check_page(s, p, v);
	copy_page(to, p->data[v]);
	WRITE_ONCE(*pte, (u64)to | DATA_RW);
	invlpg(va);
	put_page(p->data[v]);
	p->data[v] = to;
	s->moves++;
}

/* A write to a shared page (a copy-on-write fault): a private copy, or the page itself made writable if
 * nobody else maps it any more; INVLPG either way. */
static bool copy_on_write(struct cpu_stats *s, struct proc *p, u32 v)
{
	u64 va = data_va(v), *pte = walk(s, p, va, 1, false);
	u64 *old = p->data[v];
	if (page_ref_count(old) == 1) {
		WRITE_ONCE(*pte, (u64)old | DATA_RW);
		invlpg(va);
		s->cow_reuses++;
		return true;
	}
	u64 *copy = alloc_page(s, ROLE_DATA, p->gen, v);
	if (!copy)
		return false;
	copy_page(copy, old);
	WRITE_ONCE(*pte, (u64)copy | DATA_RW);
	invlpg(va);
	p->data[v] = copy;
	put_page(old);
	s->cow_copies++;
	return true;
}

/* fork: an empty slot gets a child sharing `p`'s data pages, read-only in both (the parent's PTEs are
 * write-protected and INVLPG'd here, where its CR3 is loaded). */
static void fork_proc(struct cpu_stats *s, struct proc *p)
{
	struct proc *q = NULL;
	for (u32 k = 0; k < opt_procs && !q; k++) {
		struct proc *t = &procs[k];
		if (!READ_ONCE(t->busy) && !READ_ONCE(t->gen) && atomic_xchg(&t->busy, 1) == 0) {
			if (t->gen == 0)
				q = t;
			else
				WRITE_ONCE(t->busy, 0);
		}
	}
	if (!q)
		return;
	if (create_proc(s, q, p)) {
		for (u32 v = 0; v < opt_nv; v++) {
			if (!p->data[v])
				continue;
			u64 *pte = walk(s, p, data_va(v), 1, false);
			WRITE_ONCE(*pte, (u64)p->data[v] | DATA_RO);
			invlpg(data_va(v));
			if (!map_page(s, q, data_va(v), p->data[v], DATA_RO)) {
				q->state[v] = 0;
				continue;
			}
			get_page(p->data[v]);
			q->data[v] = p->data[v];
		}
		s->forks++;
	}
	WRITE_ONCE(q->busy, 0);
}

/* Before an exiting process's page tables go back to the pool, no other CPU may still have its CR3 loaded
 * (Linux's freed-tables flush reaches lazy CPUs): each one that does gets V_LEAVE and acknowledges it. */
static void evict_lazy_users(struct cpu_stats *s, u32 c, struct proc *p)
{
	for (u32 o = 0; o < ncpus; o++) {
		if (o == c || READ_ONCE(loaded_cr3[o]) != (u64)p->pml4)
			continue;
		u32 acks = READ_ONCE(leave_acks[o]);
		s->leave_ipis++;
		if (!apic_send_fixed(cpu_to_apic_id(o), V_LEAVE) || !wait_ge(&leave_acks[o], acks + 1, WAIT_MS))
			s->leave_timeouts++;
	}
}

/* An address space goes back to the pool, CPU c's CR3 and every other CPU's away from it first. */
static u64 xchg64(u64 *p, u64 v)
{
	__asm__ volatile("xchgq %0, %1" : "+r"(v), "+m"(*p) : : "memory");
	return v;
}

/* With `zap=1` (the default), an address space's entries are cleared before its pages go back to the pool,
 * as Linux's exit_mmap does: each user PTE with XCHG (ptep_get_and_clear), then every entry of the
 * paging-structure pages with a store (free_pgtables), the PML4's user slot last. */
static void zap_mm(struct proc *p)
{
	static const u64 user_va[] = { CODE_VA, STATE_VA };
	for (u32 v = 0; v < MAX_NV + 2; v++) {
		u64 va = v < MAX_NV ? data_va(v) : user_va[v - MAX_NV];
		u64 *pte = v < MAX_NV && !p->data[v] ? NULL : walk(NULL, p, va, 1, false);
		if (pte)
			xchg64(pte, 0);
	}
	for (u32 t = 0; t < p->ntables; t++)
		for (u32 i = 0; i < 512; i++)
			if (p->tables[t][i])
				WRITE_ONCE(p->tables[t][i], 0);
	WRITE_ONCE(p->pml4[USER_VA >> 39], 0);
}

static void release_mm(struct cpu_stats *s, u32 c, struct proc *p)
{
	evict_lazy_users(s, c, p);
	if (opt_zap)
		zap_mm(p);
	for (u32 v = 0; v < MAX_NV; v++)
		if (p->data[v]) {
			check_page(s, p, v);
			put_page(p->data[v]);
			p->data[v] = NULL;
		}
	free_page((u64)p->state);
	for (u32 t = 0; t < p->ntables; t++)
		free_page((u64)p->tables[t]);
	p->ntables = 0;
	free_page((u64)p->pml4);
	s->exited++;
}

static void exit_proc(struct cpu_stats *s, u32 c, struct proc *p)
{
	switch_cr3(c, (u64)pml4, false);
	release_mm(s, c, p);
	WRITE_ONCE(p->gen, 0);
}

/* exec, as Linux does it: the new address space is built while the old one is loaded (its first data pages
 * written by the kernel and mapped: the arguments on a new stack), CR3 switches to it, then the old one goes
 * back to the pool. The new image runs from whichever CPU takes it next. */
static bool exec_proc(struct cpu_stats *s, u32 c, struct proc *p)
{
	struct proc old = *p;
	if (!create_proc(s, p, NULL))
		return false;
	switch_cr3(c, (u64)p->pml4, true);
	release_mm(s, c, &old);
	s->execs++;
	return true;
}

/* `remote=N`: after one in N quanta a CPU migrates a data page of a process that another CPU is running in user
 * mode at that moment, as Linux's page migration, compaction and reclaim do from kcompactd, kswapd or another
 * process (try_to_migrate, then move_to_new_folio and remove_migration_ptes): the PTE cleared with XCHG, a TLB
 * shootdown IPI to the CPU that runs the process (INVLPG there, acknowledged), the page copied to a new one
 * from the pool, the new PTE set, the old page freed. The running process meanwhile takes not-present faults on
 * the page and retries (Linux's migration-entry wait). So here, unlike everywhere else in this guest, one vCPU's
 * kernel (emulated on this host) writes the paging entries of an address space that another vCPU runs in user
 * mode (natively, on the host's shadow page tables), racing that vCPU's shadow page faults on the same
 * entries. The words of the page stay the same, so the user checks hold across a migration. */
static spinlock_t migrate_lock;
static volatile u64 flush_va[MAX_CPUS];
static volatile u32 flush_acks[MAX_CPUS];

static void flush_handler(struct irq_frame *f, u32 cpu)
{
	u32 c = cpu_by_apic();
	invlpg(flush_va[c]);
	atomic_inc(&flush_acks[c]);
	apic_eoi();
}

static bool shoot_down(struct cpu_stats *s, u32 o, u64 va)
{
	u32 acks = READ_ONCE(flush_acks[o]);
	flush_va[o] = va;
	if (apic_send_fixed(cpu_to_apic_id(o), V_FLUSH) && wait_ge(&flush_acks[o], acks + 1, WAIT_MS))
		return true;
	s->remote_flush_timeouts++;
	return false;
}

static void migrate_page(struct cpu_stats *s, u32 o, struct proc *p, u32 v)
{
	u64 va = data_va(v), *pte = walk(NULL, p, va, 1, false);
	if (!pte || !(*pte & PTE_P) || !(*pte & PTE_W) || !p->data[v] || page_ref_count(p->data[v]) != 1)
		return;
	u64 *to = alloc_page(s, ROLE_DATA, p->gen, v);
	if (!to)
		return;
	WRITE_ONCE(p->migrating, v + 1);
	u64 old = xchg64(pte, 0);
	shoot_down(s, o, va);
	copy_page(to, (u64 *)(old & PTE_ADDR));
	p->data[v] = to;
	WRITE_ONCE(*pte, (u64)to | DATA_RW);
	shoot_down(s, o, va); /* not needed for a not-present entry; Linux flushes after remove_migration_ptes too */
	WRITE_ONCE(p->migrating, 0);
	put_page((u64 *)(old & PTE_ADDR));
	s->remote_moves++;
}

/* Picks a process another CPU runs now and migrates one of its data pages (not file-backed ones: shared). */
static void remote_migrate(u32 c)
{
	struct cpu_stats *s = &stats[c];
	u32 o = (u32)(rng_next(s) % ncpus);
	if (o == c)
		return;
	spin_lock(&migrate_lock);
	struct proc *p = (struct proc *)READ_ONCE(running[o]);
	if (p) {
		spin_lock(&p->mlock);
		u32 v = (u32)(rng_next(s) % opt_nv);
		if (READ_ONCE(running[o]) == p && !is_file_backed(v))
			migrate_page(s, o, p, v);
		spin_unlock(&p->mlock);
	}
	spin_unlock(&migrate_lock);
}

/* A bad user read: where the word that was read lives in the pool, at the same page offset. */
static void explain_bad_read(struct cpu_stats *s, u32 c, struct proc *p)
{
	u64 va = p->state[ST_BAD_VA], seen = p->state[ST_BAD_SEEN], off = va & 4095;
	u64 *pte = walk(s, p, va, 1, false);
	s->bad_va = va;
	s->bad_exp = p->state[ST_BAD_EXP];
	s->bad_seen = seen;
	s->bad_pa = pte ? *pte : 0;
	s->bad_gen = p->gen;
	s->bad_quantum = s->quanta;
	if (!opt_verbose || s->printed >= 8)
		return;
	s->printed++;
	printf("INFO: cpu %u proc %u quantum %lu: %lu words differ, first at %lx (pte %lx): tag %lx, read %lx\n", c,
	       p->gen, s->quanta, p->state[ST_BAD], va, s->bad_pa, s->bad_exp, seen);
	for (u32 i = 0; i < pool_pages; i++)
		if (pool[i][off / 8] == seen)
			printf("INFO:   pool page %lx (role %u, last %u, owner %u, vpage %u, refs %u) holds it there\n",
			       (u64)pool[i], page_role[i], page_last_use[i], page_owner[i], page_vpage[i], page_refs[i]);
}

/* Anything unexpected in user mode or the entries: recorded, and the quantum ends (RAX = 1 + vector). */
static void unexpected(struct irq_frame *f, u32 unused)
{
	u32 c = cpu_by_apic();
	struct cpu_stats *s = &stats[c];
	if (s->faulted++ == 0) {
		s->fault_vector = f->vector;
		s->fault_rip = f->rip;
		s->fault_cs = f->cs;
		s->fault_error = f->error;
		s->fault_cr2 = read_cr2();
	}
	f->rax = 1 + f->vector;
	f->rip = (u64)quantum_leave;
	f->cs = KCODE;
	f->ss = KDATA;
	f->rsp = pcpu[c].resume_rsp;
	f->rflags = 2;
}

/* A user page fault: the fault entry's quantum end, a demand fault on a data page (a new tagged page), or a
 * write to a shared one (copy on write). */
static void page_fault(struct irq_frame *f, u32 cpu)
{
	u64 cr2 = read_cr2();
	u32 c = cpu_by_apic();
	struct cpu_stats *s = &stats[c];
	struct proc *p = (struct proc *)running[c];
	if ((f->cs & 3) != 3 || !p) {
		unexpected(f, cpu);
		return;
	}
	if (!opt_syscall && cr2 == MAGIC_VA) {
		f->rip = (u64)quantum_leave;
		f->cs = KCODE;
		f->ss = KDATA;
		f->rsp = pcpu[c].resume_rsp;
		f->rflags = 2;
		return; /* RAX is the user code's QUIT_DONE */
	}
	for (u32 v = 0; v < opt_nv; v++) {
		if (cr2 >> 12 != data_va(v) >> 12)
			continue;
		bool present = f->error & 1, write = f->error & 2;
		if (!present && READ_ONCE(p->migrating) == v + 1) {
			s->migration_retries++; /* back to user mode, where the shootdown IPI can come in */
			return;
		}
		if (!present && !p->data[v] && map_new_data(s, p, v)) {
			s->demand_faults++;
			return;
		}
		if (present && write && p->data[v] && copy_on_write(s, p, v))
			return;
		break;
	}
	unexpected(f, cpu);
}

/* UD2 from the user code is the fault entry's round trip: the answer in RAX, past the UD2. */
static void invalid_opcode(struct irq_frame *f, u32 cpu)
{
	if (opt_syscall || (f->cs & 3) != 3) {
		unexpected(f, cpu);
		return;
	}
	f->rax = TRIP_ANSWER;
	f->rip += 2;
}

static void tick_handler(struct irq_frame *f, u32 cpu) { apic_eoi(); }

static void ipi_handler(struct irq_frame *f, u32 cpu)
{
	ring_received(cpu);
	apic_eoi();
}

/* V_LEAVE: a lazy CPU loads the kernel's CR3 (interrupts are off wherever `lazy` and CR3 change). */
static void leave_handler(struct irq_frame *f, u32 cpu)
{
	u32 c = cpu_by_apic();
	if (lazy[c])
		switch_cr3(c, (u64)pml4, false);
	atomic_inc(&leave_acks[c]);
	apic_eoi();
}

/* Takes a process no CPU runs, starting at a random slot. */
static struct proc *take_proc(struct cpu_stats *s)
{
	u32 start = (u32)(rng_next(s) % opt_procs);
	for (u32 k = 0; k < opt_procs; k++) {
		struct proc *p = &procs[(start + k) % opt_procs];
		if (!READ_ONCE(p->busy) && atomic_xchg(&p->busy, 1) == 0)
			return p;
	}
	return NULL;
}

/* What the kernel does to a process after its quantum, at random: unmap a data page, move one, fork, or
 * nothing; and the exit after `life` quanta. */
static void after_quantum(u32 c, struct proc *p)
{
	struct cpu_stats *s = &stats[c];
	u64 r = rng_next(s) % 8;
	u32 v = (u32)(rng_next(s) % opt_nv);
	if (r < 2 && p->data[v])
		unmap_data(s, p, v);
	else if (r < 4 && p->data[v])
		move_data(s, p, v);
	else if (r < 6)
		fork_proc(s, p);
	if (++p->quanta < opt_life) {
		if (!opt_lazy)
			switch_cr3(c, (u64)pml4, false);
	} else if (r >= 4 || !exec_proc(s, c, p)) {
		exit_proc(s, c, p);
	} else if (!opt_lazy) {
		switch_cr3(c, (u64)pml4, false);
	}
}

/* One quantum of a process on CPU c. Returns false if the CPU must stop (an unexpected fault, an empty
 * pool). */
static bool run_quantum(u32 c, struct proc *p)
{
	struct cpu_stats *s = &stats[c];
	if (!p->gen && !create_proc(s, p, NULL))
		return false;
	if (p->last_cpu != c + 1 && p->last_cpu)
		s->migrations++;
	p->last_cpu = c + 1;
	p->state[ST_NV] = opt_nv;
	p->state[ST_REPS] = opt_reps;
	p->state[ST_ROUND] = s->quanta;
	p->state[ST_SYSCALL] = opt_syscall;
	p->state[ST_BAD] = 0;
	p->state[ST_TRIPS] = 0;
	for (u32 v = 0; v < opt_nv; v++)
		p->state[ST_VA + v] = data_va(v);
	switch_cr3(c, (u64)p->pml4, false);
	WRITE_ONCE(running[c], p);
	u64 quit = enter_user(CODE_VA, STATE_VA + 4096, 0x202);
	lazy[c] = 1; /* interrupts are off until the sti below */
	WRITE_ONCE(running[c], NULL);
	sti();
	spin_lock(&p->mlock); /* a migration of one of its pages that began before is over */
	spin_unlock(&p->mlock);
	s->quanta++;
	s->trips += p->state[ST_TRIPS];
	if (p->state[ST_BAD]) {
		s->user_bad += p->state[ST_BAD];
		explain_bad_read(s, c, p);
	}
	if (quit != QUIT_DONE)
		return false;
	after_quantum(c, p);
	return s->empty_pool == 0;
}

/* With `pge=1` (the default) the kernel's identity map is global and CR4.PGE is set, as under Linux: a MOV to
 * CR3 then keeps the kernel's translations and drops only the user ones (SDM vol. 3 4.10.2.4). */
static void make_kernel_map_global(void)
{
	u64 *pdpt = (u64 *)(pml4[0] & PTE_ADDR);
	for (u32 i = 0; i < 4; i++) {
		if (!(pdpt[i] & PTE_P))
			continue;
		u64 *pd = (u64 *)(pdpt[i] & PTE_ADDR);
		for (u32 j = 0; j < 512; j++)
			if (pd[j] & PTE_P)
				pd[j] |= 1ul << 8; /* G */
	}
}

static void enable_global_pages(void)
{
	u64 cr4;
	__asm__ volatile("mov %%cr4, %0" : "=r"(cr4));
	__asm__ volatile("mov %0, %%cr4" : : "r"(cr4 | 0x80) : "memory"); /* CR4.PGE */
}

static void worker(void *unused)
{
	u32 c = this_cpu();
	struct cpu_stats *s = &stats[c];
	struct pcpu *pc = &pcpu[c];
	cli();
	load_user_gdt(c);
	pc->self = (u64)pc;
	pc->tss = (u64)user_tss[c];
	wrmsr(MSR_GS_BASE, (u64)pc);
	if (opt_syscall) {
		wrmsr(MSR_STAR, ((u64)SYSRET_BASE << 48) | ((u64)KCODE << 32));
		wrmsr(MSR_LSTAR, (u64)sc_entry);
		wrmsr(MSR_SFMASK, SFMASK);
		wrmsr(MSR_EFER, rdmsr(MSR_EFER) | EFER_SCE);
	}
	s->rng = opt_seed * 0x9E3779B97F4A7C15ul + c + 1;
	loaded_cr3[c] = read_cr3();
	if (opt_pge)
		enable_global_pages();
	start_periodic_tick(V_TICK, opt_tick_us);
	sti();
	u64 t0 = rdtsc(), deadline = t0 + ms_to_tsc(opt_ms);
	while (s->quanta < opt_quanta && rdtsc() < deadline) {
		struct proc *p = take_proc(s);
		if (!p) {
			cpu_relax();
			continue;
		}
		bool go_on = run_quantum(c, p);
		WRITE_ONCE(p->busy, 0);
		if (!go_on)
			break;
		if (s->quanta % 16 == 0)
			ring_ping(c, V_IPI);
		if (opt_remote && rng_next(s) % opt_remote == 0)
			remote_migrate(c);
		if (s->quanta % 32 == 31) {
			cli();
			sti_hlt();
		}
	}
	stop_tick();
	s->ms = (rdtsc() - t0) / tsc_khz();
	atomic_inc(&workers_done);
}

static void read_options(void)
{
	opt_ms = cmdline_u64("ms", 15000);
	opt_quanta = cmdline_u64("quanta", 30);
	opt_procs = cmdline_u64("procs", 0);
	opt_nv = cmdline_u64("nv", 8);
	opt_life = cmdline_u64("life", 6);
	opt_reps = cmdline_u64("reps", 4);
	opt_tick_us = cmdline_u64("tick_us", 1000);
	opt_seed = cmdline_u64("seed", 1);
	opt_verbose = cmdline_u64("verbose", 0);
	opt_syscall = cmdline_u64("syscall", 1) != 0;
	opt_lazy = cmdline_u64("lazy", 1) != 0;
	opt_bulk = cmdline_u64("bulk", 0);
	opt_zap = cmdline_u64("zap", 1) != 0;
	opt_spread = cmdline_u64("spread", 1) != 0;
	opt_pge = cmdline_u64("pge", 1) != 0;
	opt_files = cmdline_u64("files", 2);
	opt_pool_mb = cmdline_u64("pool_mb", 0);
	opt_remote = cmdline_u64("remote", 0);
	if (opt_procs == 0 || opt_procs > MAX_PROCS)
		opt_procs = 3 * ncpus < MAX_PROCS ? 3 * ncpus : MAX_PROCS;
	if (opt_nv == 0 || opt_nv > MAX_NV)
		opt_nv = MAX_NV;
	if (opt_files > MAX_FILES || opt_files >= opt_nv)
		opt_files = opt_nv / 2 < MAX_FILES ? opt_nv / 2 : MAX_FILES;
	if (opt_reps == 0)
		opt_reps = 1;
	if (opt_life == 0)
		opt_life = 1;
}

/* `pool_mb=N`: the pool moves to N MiB of RAM from the first 2 MiB boundary above the image (the identity map
 * covers 4 GiB); false if the RAM fw_cfg reports is too small. */
static bool place_pool(void)
{
	if (opt_pool_mb == 0)
		return true;
	u64 base = ((u64)__image_end + (2ul << 20) - 1) & ~((2ul << 20) - 1);
	u64 pages = opt_pool_mb * 256, ram = fwcfg_ram_size();
	if (pages > MAX_POOL || base + pages * 4096 > ram || ram > (4ul << 30))
		return false;
	pool = (u64(*)[512])base;
	pool_pages = (u32)pages;
	return true;
}

static void report_cpu(u32 c)
{
	struct cpu_stats *s = &stats[c];
	printf("INFO: cpu %u: %lu quanta in %lu ms, %lu processes created (%lu by fork, %lu by exec), %lu exited, "
	       "%lu moved in, %lu demand faults (%lu of file pages), %lu copy-on-write copies (%lu made writable), "
	       "%lu unmaps (%lu page tables freed), %lu moves, %lu round trips, %lu lazy cpus sent away "
	       "(%lu timed out), %u ipis sent, %u received\n",
	       c, s->quanta, s->ms, s->created, s->forks, s->execs, s->exited, s->migrations, s->demand_faults,
	       s->file_maps, s->cow_copies, s->cow_reuses, s->unmaps, s->tables_freed, s->moves, s->trips,
	       s->leave_ipis, s->leave_timeouts, ring_sent[c], ring_got[c]);
	if (opt_remote)
		printf("INFO: cpu %u: %lu pages of processes running elsewhere migrated (%lu shootdowns timed out), %lu "
		       "faults retried during a migration\n",
		       c, s->remote_moves, s->remote_flush_timeouts, s->migration_retries);
	if (s->faulted)
		printf("INFO: cpu %u: %u unexpected faults, the first vector %lu at rip %lx cs %lx error %lx cr2 %lx\n",
		       c, s->faulted, s->fault_vector, s->fault_rip, s->fault_cs, s->fault_error, s->fault_cr2);
	if (s->user_bad)
		printf("INFO: cpu %u: %lu words read wrong in user mode, the last case in proc %u at quantum %lu: %lx "
		       "(pte %lx) tag %lx, read %lx\n",
		       c, s->user_bad, s->bad_gen, s->bad_quantum, s->bad_va, s->bad_pa, s->bad_exp, s->bad_seen);
	if (s->kernel_bad)
		printf("INFO: cpu %u: %lu sampled words wrong in pages, the first in %lx: tag %lx, held %lx\n", c,
		       s->kernel_bad, s->kbad_pa, s->kbad_exp, s->kbad_seen);
	if (s->empty_pool)
		printf("INFO: cpu %u: the page pool ran dry\n", c);
}

void guest_main(void)
{
	platform_init(false);
	check(smp_start_all() == ncpus, "all cpus online", "not all APs came up");
	read_options();
	irq_set_handler(6, invalid_opcode);
	irq_set_handler(13, unexpected);
	irq_set_handler(14, page_fault);
	irq_set_handler(V_TICK, tick_handler);
	irq_set_handler(V_IPI, ipi_handler);
	irq_set_handler(V_LEAVE, leave_handler);
	irq_set_handler(V_FLUSH, flush_handler);
	bool placed = place_pool();
	for (u32 i = 0; i < pool_pages; i++)
		free_list[free_top++] = pool_pages - 1 - i;
	if (opt_pge)
		make_kernel_map_global();
	check(placed && fill_page_cache(), "the page cache filled", "pool_mb=%lu: %s", opt_pool_mb,
	      placed ? "the pool ran dry" : "more than the RAM above the image");
	printf("INFO: %u cpus, %lu quanta each, %lu processes of %lu data pages, %lu quanta per process, entry by %s, %s "
	       "address spaces, bound %lu ms\n",
	       ncpus, opt_quanta, opt_procs, opt_nv, opt_life, opt_syscall ? "syscall" : "fault", opt_lazy ? "lazy" : "no lazy",
	       opt_ms);
	bool started = true;
	for (u32 c = 1; c < ncpus; c++)
		started &= smp_call_async(c, worker, NULL);
	worker(NULL);
	bool all_done = wait_eq(&workers_done, ncpus, opt_ms + WAIT_MS);
	for (u32 c = 1; c < ncpus; c++)
		smp_wait(c, WAIT_MS);
	check(started && all_done, "the process loop ran on every cpu", "started %d, %u of %u cpus done", started,
	      workers_done, ncpus);
	u64 faulted = 0, user_bad = 0, kernel_bad = 0, to_table = 0, to_data = 0, exited = 0, min_quanta = ~0ul;
	u64 trips = 0, quanta = 0, empty = 0, forks = 0, cow = 0, leave_timeouts = 0, max_quanta = 0;
	for (u32 c = 0; c < ncpus; c++) {
		struct cpu_stats *s = &stats[c];
		report_cpu(c);
		faulted += s->faulted;
		user_bad += s->user_bad;
		kernel_bad += s->kernel_bad;
		to_table += s->role_to_table;
		to_data += s->role_to_data;
		exited += s->exited;
		trips += s->trips;
		quanta += s->quanta;
		empty += s->empty_pool;
		forks += s->forks;
		cow += s->cow_copies;
		leave_timeouts += s->leave_timeouts;
		min_quanta = s->quanta < min_quanta ? s->quanta : min_quanta;
		max_quanta = s->quanta > max_quanta ? s->quanta : max_quanta;
	}
	printf("INFO: %lu quanta, %lu processes exited, %lu data pages reused as page tables, %lu page tables as "
	       "data pages\n",
	       quanta, exited, to_table, to_data);
	check(faulted == 0 && empty == 0, "no unexpected fault in user mode or the kernel entries",
	      "%lu faults, pool empty %lu times", faulted, empty);
	/* Starvation, not speed: where the bound ended the run (a loaded host slows every CPU alike), each CPU
	 * must still have made a third as many quanta as the busiest one. */
	check(min_quanta > 0 && (min_quanta * 3 >= opt_quanta || min_quanta * 3 >= max_quanta),
	      "no cpu starved, each ran a third of its quanta or of the busiest cpu's",
	      "fewest %lu, most %lu of %lu in %lu ms", min_quanta, max_quanta, opt_quanta, opt_ms);
	check(trips == quanta * opt_nv, "every round trip to the kernel returned its answer", "%lu of %lu", trips,
	      quanta * opt_nv);
	check(leave_timeouts == 0, "every lazy cpu left an exiting address space when asked", "%lu timed out",
	      leave_timeouts);
	check(forks > 0 && cow > 0, "processes forked and copied shared pages on write", "%lu forks, %lu copies",
	      forks, cow);
	check(exited > 0 && to_table > 0 && to_data > 0,
	      "processes exited and their pages were reused as page tables and as data",
	      "%lu exits, %lu data pages reused as tables, %lu tables as data", exited, to_table, to_data);
	check(user_bad == 0, "user reads return the words last written at each address", "%lu words differ",
	      user_bad);
	check(kernel_bad == 0, "each page holds what user mode wrote through its mapping", "%lu sampled words differ",
	      kernel_bad);
	if (ncpus > 1)
		check(wait_until(ring_all_landed, NULL, WAIT_MS), "every ipi between the cpus arrived",
		      "sent and received differ");
	else
		skip("every ipi between the cpus arrived", "only 1 CPU");
}
