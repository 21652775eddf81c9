/* soft_int: the software interrupts `int3` and `int $0x80` in 64-bit ring 0 reach their IDT handlers with the
 * address of the next instruction as the saved RIP (SDM vol. 2A, INT n/INTO/INT3/INT1: the return address
 * pushed is that of the instruction after; vol. 3 6.5: #BP is a trap), once each, with IF as the gate leaves it.
 * KVM's emulator on this host cannot run either instruction in 64-bit mode (docs/kvm-facts.md); irqvm's
 * `emulate` module delivers them after the emulation failure. On a host that runs them the checks pass too.
 * Then the same from 64-bit user mode (below): on this host no exit shows them, and `int imm8` raises #UD. */
#include "usermode.h"

#define SOFT_VECTOR 0x80

static volatile u64 saved_rip[256];
static volatile u32 taken[256];

static void soft_handler(struct irq_frame *f, u32 cpu)
{
	saved_rip[f->vector] = f->rip;
	taken[f->vector]++;
}

/* ---- CPL 3 ---------------------------------------------------------------------------------------------------
 * The same instructions from 64-bit user mode, as a 64-bit Linux process makes a 32-bit system call (IA32
 * emulation's gate 0x80 has DPL 3) or hits a breakpoint. INT n and INT3 check the gate's DPL against CPL (SDM
 * vol. 2A, INT n/INTO/INT3/INT1: "IF software interrupt AND DPL < CPL THEN #GP(vector * 8 + 2)"), then switch to
 * the TSS's RSP0 and push the user SS:RSP, RFLAGS, CS and the next instruction's RIP (vol. 3 6.12.1). The user
 * code (its own page at USER_VA, with a stack page) runs, in order: `int $0x80` with eax = 0x1234 (gate DPL 3),
 * `int $0x81` (gate DPL 0), `int3` (gate 3 at DPL 3; the #BP handler then lowers it to DPL 0), `int3` again,
 * and `ud2`, whose #UD goes back to the kernel side. Every handler taken from CPL 3 logs its vector, saved RIP,
 * CS, SS, error code and RAX; one taken at an `int` instruction (a fault, RIP at the instruction) skips it, so
 * that each instruction gets its chance whatever the one before it did. */
#define USER_VA 0x8000000000ul      /* PML4 slot 1: nothing else is mapped there */
#define PTE_P 1ul
#define PTE_W 2ul
#define PTE_U 4ul
#define USER_RAX 0x1234
#define DPL0_VECTOR 0x81
#define BP_VECTOR 3
#define UD_VECTOR 6
#define GP_VECTOR 13
#define OP_INT3 0xCC
#define OP_INT_N 0xCD
#define USER_EVENTS 8

u64 user_resume_rsp;                /* enter_user's frame, where the way back to the kernel side resumes */
extern char user_code[], user_int81[], user_int3_dpl0[], user_ud2[], user_left[];
void enter_user(u64 rip, u64 rsp, void *tss);

__asm__(
	"	.text\n"
	/* enter_user(rip, rsp, tss): saves the callee-saved registers, points TSS.RSP0 below them and IRETQs to
	 * CPL 3. Returns when a handler sends the user code to user_left. */
	"	.globl enter_user, user_left\n"
	"enter_user:\n"
	"	pushq %rbp\n	pushq %rbx\n	pushq %r12\n	pushq %r13\n	pushq %r14\n	pushq %r15\n"
	"	cli\n"
	"	movq %rsp, user_resume_rsp(%rip)\n"
	"	leaq -1024(%rsp), %rax\n"
	"	movq %rax, 4(%rdx)\n"          /* TSS.RSP0 (SDM vol. 3 8.7) */
	"	pushq $0x2B\n"                 /* SS: UDATA */
	"	pushq %rsi\n"
	"	pushq $0x202\n"                /* RFLAGS: IF */
	"	pushq $0x33\n"                 /* CS: UCODE */
	"	pushq %rdi\n"
	"	iretq\n"
	"user_left:\n"
	"	movq user_resume_rsp(%rip), %rsp\n"
	"	popq %r15\n	popq %r14\n	popq %r13\n	popq %r12\n	popq %rbx\n	popq %rbp\n"
	"	ret\n"
	/* The user code, alone on its page, position independent. */
	"	.balign 4096\n"
	"	.globl user_code, user_int80, user_int81, user_int3_dpl3, user_int3_dpl0, user_ud2\n"
	"user_code:\n"
	"	movl $0x1234, %eax\n"          /* USER_RAX */
	"user_int80:\n"
	"	int $0x80\n"
	"user_int81:\n"
	"	int $0x81\n"
	"user_int3_dpl3:\n"
	"	int3\n"
	"user_int3_dpl0:\n"
	"	int3\n"
	"user_ud2:\n"
	"	ud2\n"
	"	.balign 4096\n");

static u64 user_pdpt[512] __attribute__((aligned(4096)));
static u64 user_pd[512] __attribute__((aligned(4096)));
static u64 user_pt[512] __attribute__((aligned(4096)));
static u8 user_stack[4096] __attribute__((aligned(4096)));
extern u64 pml4[512];

/* What the handlers taken from CPL 3 saw, in order. */
struct user_event {
	u64 vector, rip, cs, ss, error, rax;
};
static volatile struct user_event user_events[USER_EVENTS];
static volatile u32 user_event_count;

static u64 user_addr(const char *sym) { return USER_VA + (u64)(sym - user_code); }

/* Back to enter_user's caller: an IRETQ to CPL 0 at user_left. */
static void leave_user(struct irq_frame *f)
{
	f->rip = (u64)user_left;
	f->cs = KCODE;
	f->ss = KDATA;
	f->rsp = user_resume_rsp;
	f->rflags = 0x2;
}

/* The length of the software-interrupt instruction at user address `rip`, 0 if there is none. */
static u64 int_insn_len(u64 rip)
{
	if (rip < USER_VA || rip >= user_addr(user_ud2))
		return 0;
	u8 op = *(const volatile u8 *)(user_code + (rip - USER_VA));
	return op == OP_INT_N ? 2 : op == OP_INT3 ? 1 : 0;
}

static void user_event(struct irq_frame *f, u32 cpu)
{
	if (!(f->cs & 3)) {
		if (f->vector == SOFT_VECTOR || f->vector == BP_VECTOR)
			soft_handler(f, cpu);
		else
			panic("exception %lu at CPL 0, rip %lx, error %lx", f->vector, f->rip, f->error);
		return;
	}
	u32 n = user_event_count++;
	if (n < USER_EVENTS)
		user_events[n] = (struct user_event){ f->vector, f->rip, f->cs, f->ss, f->error, f->rax };
	if (f->vector == BP_VECTOR)
		idt_set_gate_dpl(BP_VECTOR, 0);
	u64 len = f->vector < 32 && f->vector != BP_VECTOR ? int_insn_len(f->rip) : 0;
	if (len && n < USER_EVENTS)
		f->rip += len;
	else if (f->vector < 32 && f->vector != BP_VECTOR)
		leave_user(f);
}

static const u32 user_event_vectors[] = { BP_VECTOR, UD_VECTOR, 11, 12, GP_VECTOR, 14, SOFT_VECTOR, DPL0_VECTOR };
#define N_USER_EVENT_VECTORS (sizeof(user_event_vectors) / sizeof(user_event_vectors[0]))

static void map_user_pages(void)
{
	user_pt[0] = (u64)user_code | PTE_P | PTE_U;
	user_pt[1] = (u64)user_stack | PTE_P | PTE_W | PTE_U;
	user_pd[0] = (u64)user_pt | PTE_P | PTE_W | PTE_U;
	user_pdpt[0] = (u64)user_pd | PTE_P | PTE_W | PTE_U;
	pml4[USER_VA >> 39] = (u64)user_pdpt | PTE_P | PTE_W | PTE_U;
	u64 cr3;
	__asm__ volatile("mov %%cr3, %0; mov %0, %%cr3" : "=r"(cr3) : : "memory");
}

/* Checks that user event `i` is `vector` with saved RIP `rip` (and, for a #GP, error code `error`). */
static void check_event(u32 i, u64 vector, u64 rip, u64 error, const char *name)
{
	struct user_event e = { 0 };
	if (i < user_event_count && i < USER_EVENTS)
		e = user_events[i];
	check(i < user_event_count && e.vector == vector && e.rip == rip && (vector != GP_VECTOR || e.error == error),
	      name, "event %u of %u: vector %lu, rip %lx, error %lx (expected vector %lu, rip %lx, error %lx)", i,
	      user_event_count, e.vector, e.rip, e.error, vector, rip, vector == GP_VECTOR ? error : 0);
}

static void int_from_user_mode(void)
{
	load_user_gdt(0);
	map_user_pages();
	idt_set_gate_dpl(SOFT_VECTOR, 3);
	idt_set_gate_dpl(BP_VECTOR, 3);
	for (u32 i = 0; i < N_USER_EVENT_VECTORS; i++)
		irq_set_handler(user_event_vectors[i], user_event);
	enter_user(USER_VA, USER_VA + 2 * 4096, user_tss[0]);
	for (u32 i = 0; i < N_USER_EVENT_VECTORS; i++)
		irq_set_handler(user_event_vectors[i], 0);
	irq_set_handler(SOFT_VECTOR, soft_handler);
	irq_set_handler(BP_VECTOR, soft_handler);

	check_event(0, SOFT_VECTOR, user_addr(user_int81), 0,
		    "int $0x80 from cpl 3 reaches its dpl-3 gate with the next rip [pvm-user-int-n]");
	struct user_event e = user_events[0];
	check(user_event_count > 0 && e.vector == SOFT_VECTOR && e.cs == UCODE && e.ss == UDATA && e.rax == USER_RAX,
	      "int $0x80 from cpl 3 saves the user's cs and ss and keeps eax [pvm-user-int-n]",
	      "vector %lu, cs %lx, ss %lx, rax %lx", e.vector, e.cs, e.ss, e.rax);
	check_event(1, GP_VECTOR, user_addr(user_int81), DPL0_VECTOR * 8 + 2,
		    "int $0x81 from cpl 3 through a dpl-0 gate raises #gp(vector * 8 + 2) [pvm-user-int-n] [tcg-int-gp-error]");
	check_event(2, BP_VECTOR, user_addr(user_int3_dpl0), 0,
		    "int3 from cpl 3 through a dpl-3 gate reaches #bp with the next rip");
	check_event(3, GP_VECTOR, user_addr(user_int3_dpl0), BP_VECTOR * 8 + 2,
		    "int3 from cpl 3 through a dpl-0 gate raises #gp(3 * 8 + 2) [pvm-user-int3-dpl] [tcg-int-gp-error]");
	check_event(4, UD_VECTOR, user_addr(user_ud2), 0, "ud2 from cpl 3 raises #ud at the instruction");
	check(user_event_count == 5, "user mode sees one event per instruction", "%u events", user_event_count);
}

/* ---- Faults of the delivery itself (CPL 0) ----------------------------------------------------------------
 * INT n checks its gate and the gate's code segment before it reaches the handler (SDM vol. 2A, INT n pseudocode,
 * IA-32e mode; vol. 3 6.12.1, 6.14.1): an entry past the IDT limit or not a 64-bit interrupt/trap gate raises
 * #GP(vector * 8 + 2), a gate not present #NP(vector * 8 + 2); a null selector #GP(0); a selector past its table,
 * of a data segment or of DPL > CPL #GP(selector), of a segment not present #NP(selector), of one that is not 64-bit
 * code #GP(selector). These are faults: the saved RIP is the INT instruction's. On this host irqvm makes these
 * checks itself when it finishes `int n` (the host's own delivery loads any selector). */
#define GATE_VECTOR 0x90
#define NP_VECTOR 11
#define GATE_INTERRUPT 0x8E

struct gate {
	u16 off_lo, sel;
	u8 ist, type;
	u16 off_mid;
	u32 off_hi, zero;
} __attribute__((packed));
struct table_ptr {
	u16 limit;
	u64 base;
} __attribute__((packed));

/* The library's four descriptors, then the test's targets. */
static u64 gate_gdt[7] __attribute__((aligned(16))) = {
	0,
	0x00CF9A000000FFFFul, /* 0x08: 32-bit code */
	0x00CF92000000FFFFul, /* 0x10: data */
	0x00AF9A000000FFFFul, /* 0x18: 64-bit code (KCODE) */
	0x00AF1A000000FFFFul, /* 0x20: 64-bit code, not present */
	0x00AFDA000000FFFFul, /* 0x28: 64-bit code, DPL 2 */
	0x00AF9A000000FFFFul, /* 0x30: 64-bit code, present (the control) */
};

static volatile u32 gate_fault_vector;
static volatile u64 gate_fault_rip, gate_fault_error;

/* #NP and #GP at CPL 0 while the gate is tried: recorded, and the INT instruction (2 bytes) skipped. */
static void gate_fault(struct irq_frame *f, u32 cpu)
{
	gate_fault_vector = (u32)f->vector;
	gate_fault_rip = f->rip;
	gate_fault_error = f->error;
	f->rip += 2;
}

/* `int $GATE_VECTOR` through a gate with `sel` and `type`; checks that it faults with `vector` and `error` at the
 * instruction (vector 0: that it reaches the handler with the next RIP). */
static void try_gate(u16 sel, u8 type, u32 vector, u64 error, const char *name)
{
	struct table_ptr idtr;
	__asm__ volatile("sidt %0" : "=m"(idtr));
	volatile struct gate *g = (volatile struct gate *)(idtr.base + GATE_VECTOR * 16);
	u16 old_sel = g->sel;
	u8 old_type = g->type;
	g->sel = sel;
	g->type = type;
	gate_fault_vector = 0;
	u32 before = taken[GATE_VECTOR];
	u64 at, after;
	__asm__ volatile("lea 1f(%%rip), %0\n\tlea 2f(%%rip), %1\n1:\tint $0x90\n2:"
			 : "=&r"(at), "=&r"(after)
			 :
			 : "memory");
	g->sel = old_sel;
	g->type = old_type;
	u32 reached = taken[GATE_VECTOR] - before;
	if (vector == 0)
		check(reached == 1 && gate_fault_vector == 0 && saved_rip[GATE_VECTOR] == after, name,
		      "handler %u times, fault vector %u, saved rip %lx (next %lx)", reached, gate_fault_vector,
		      saved_rip[GATE_VECTOR], after);
	else
		check(reached == 0 && gate_fault_vector == vector && gate_fault_error == error && gate_fault_rip == at,
		      name, "handler %u times, vector %u error %lx rip %lx (expected vector %u error %lx rip %lx)", reached,
		      gate_fault_vector, gate_fault_error, gate_fault_rip, vector, error, at);
}

static void delivery_faults(void)
{
	struct table_ptr lib_gdt, gdtr = { sizeof(gate_gdt) - 1, (u64)gate_gdt };
	cli();
	__asm__ volatile("sgdt %0" : "=m"(lib_gdt));
	__asm__ volatile("lgdt %0" : : "m"(gdtr) : "memory");
	irq_set_handler(GATE_VECTOR, soft_handler);
	irq_set_handler(NP_VECTOR, gate_fault);
	irq_set_handler(GP_VECTOR, gate_fault);
	const u64 idt_error = GATE_VECTOR * 8 + 2;
	try_gate(0x30, GATE_INTERRUPT, 0, 0, "int n through a gate to another 64-bit code segment reaches the handler");
	try_gate(0x18, 0x0E, NP_VECTOR, idt_error, "int n through a gate not present raises #np(vector * 8 + 2)");
	try_gate(0x18, 0x8C, GP_VECTOR, idt_error, "int n through a call gate in the idt raises #gp(vector * 8 + 2)");
	try_gate(0x00, GATE_INTERRUPT, GP_VECTOR, 0, "int n through a gate with a null selector raises #gp(0)");
	try_gate(0x38, GATE_INTERRUPT, GP_VECTOR, 0x38, "int n through a selector past the gdt limit raises #gp(selector)");
	try_gate(0x10, GATE_INTERRUPT, GP_VECTOR, 0x10, "int n through a data segment selector raises #gp(selector)");
	try_gate(0x28, GATE_INTERRUPT, GP_VECTOR, 0x28, "int n to a dpl-2 code segment raises #gp(selector)");
	try_gate(0x23, GATE_INTERRUPT, NP_VECTOR, 0x20,
		 "int n to a code segment not present raises #np(selector) with rpl cleared");
	try_gate(0x08, GATE_INTERRUPT, GP_VECTOR, 0x08, "int n to a 32-bit code segment raises #gp(selector)");
	irq_set_handler(NP_VECTOR, 0);
	irq_set_handler(GP_VECTOR, 0);
	__asm__ volatile("lgdt %0" : : "m"(lib_gdt) : "memory");
}

void guest_main(void)
{
	u64 after_int3, after_int80;

	irq_set_handler(3, soft_handler);
	irq_set_handler(SOFT_VECTOR, soft_handler);
	__asm__ volatile("lea 1f(%%rip), %0\n\tint3\n1:" : "=r"(after_int3) : : "memory");
	check(taken[3] == 1, "int3 reaches the #BP handler once", "%u times", taken[3]);
	check(saved_rip[3] == after_int3, "int3 saves the rip of the next instruction", "saved %lx, expected %lx",
	      saved_rip[3], after_int3);
	__asm__ volatile("lea 1f(%%rip), %0\n\tint $0x80\n1:" : "=r"(after_int80) : : "memory");
	check(taken[SOFT_VECTOR] == 1, "int $0x80 reaches its handler once", "%u times", taken[SOFT_VECTOR]);
	check(saved_rip[SOFT_VECTOR] == after_int80, "int $0x80 saves the rip of the next instruction",
	      "saved %lx, expected %lx", saved_rip[SOFT_VECTOR], after_int80);
	__asm__ volatile("int3; int3" ::: "memory");
	check(taken[3] == 3, "two int3 in a row each reach the handler", "%u times in all", taken[3]);
	delivery_faults();
	int_from_user_mode();
}
