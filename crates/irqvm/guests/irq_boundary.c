/* irq_boundary: a pending interrupt is taken at the first instruction boundary where it becomes deliverable
 * (SDM vol. 3 §6.8.3 "masking maskable hardware interrupts", §6.8.3 STI shadow, §11.8.3.1 task and processor
 * priority, §11.8.5 EOI, §11.8.6 CR8; 82093AA datasheet §3.2.4 on unmasking), never later. Each check
 * records the RIP its handler saw and compares it with the address of the instruction right after the one
 * that made the interrupt deliverable:
 *  - two IOAPIC edge pins raised with IF=0, then `sti; nop`: the higher vector right after the nop (the end
 *    of STI's shadow); its handler EOIs and IRETs, and the lower vector comes at that IRET, so both
 *    handlers see the same interrupted RIP;
 *  - `sti; nop; cli`: the one-instruction window takes the interrupt;
 *  - a vector that a handler (IF=0) uncovers with its EOI is taken right at the handler's IRETQ, before the
 *    `cli` the IRETQ returns to: one instruction late, the `cli` would hold it until the next `sti`; also for
 *    a handler entered from HLT and one entered right after the ICR write that sent it;
 *  - TPR lowered by an xAPIC write, and by MOV CR8: right after that write;
 *  - an EOI (with IF=1 in the handler) that uncovers a vector held by the in-service one: right after the EOI;
 *  - unmasking an IOAPIC level entry whose line is high: right after the IOWIN write;
 *  - unmasking LVT LINT0 (ExtINT) while the 8259's INTR is high: right after the LVT write;
 *  - an 8259 interrupt (LINT0 in ExtINT mode) waiting for IF: right after `sti; nop`;
 *  - a self-IPI and an 8259 interrupt waiting through a long IF-clear stretch (a called function's loop, far
 *    more instructions than the VMM single-steps before it gives up) that ends in POPF: right after the POPF;
 *  - a self-IPI held by CR8 through such a stretch with IF set, then MOV CR8 lowering it: right after that;
 * and whatever the VMM does to be exact must not show: the guest's own TF still traps, PUSHF sees no TF
 * of the VMM's, DR6 is unchanged, and an instruction that faults right where the VMM starts stepping (the
 * one after the ICR write that made an interrupt wait for IF) pushes no TF of the VMM's in its frame.
 * Checks tagged [kvm-late-window] need the pending interrupt taken at that boundary: KVM's in-kernel LAPIC
 * (and its interrupt window) on the kvm_pvm hosts delivers it only at KVM's next exit (docs/kvm-facts.md).
 * [kvm-iret-step]: on the kvm_pvm hosts a single-step over an IRETQ that returns from an interrupt KVM injected
 * runs one more instruction before it exits; irqvm's `user` mode stops at the IRETQ's return address with an
 * execute breakpoint instead, and these checks fail if it were one instruction late.
 * All interrupts go to CPU 0. */
#include "guest.h"

#define LINE_LOW 10
#define LINE_HIGH 11
#define V_LOW 0x61   /* class 6 */
#define V_HIGH 0x71  /* class 7 */
#define V_TPR 0x52
#define V_CR8 0x53
#define V_OUTER 0x75 /* class 7 */
#define V_INNER 0x65 /* class 6: held while V_OUTER is in service */
#define V_UNMASK 0x68
#define V_IRET_OUTER 0x76 /* class 7 */
#define V_IRET_INNER 0x66 /* class 6: held while V_IRET_OUTER is in service */
#define PIC_BASE 0x20
#define V_EXTINT (PIC_BASE + 8 + (LINE_LOW - 8))
#define XAPIC 0xFEE00000ul
#define IOAPIC 0xFEC00000ul

static volatile u64 rip_of[256];
static volatile u32 order[8], norder;
static void record(struct irq_frame *f)
{
	rip_of[f->vector & 255] = f->rip;
	if (norder < 8)
		order[norder++] = (u32)f->vector;
}
static void record_eoi(struct irq_frame *f, u32 cpu)
{
	record(f);
	apic_eoi();
}
static void reset(void)
{
	norder = 0;
	for (int i = 0; i < 8; i++)
		order[i] = 0;
	memset((void *)rip_of, 0, sizeof(rip_of));
}
static void self_ipi(u32 v) { apic_icr_write(0, APIC_SH_SELF | v); }
/* Takes whatever is still pending, so a late delivery does not leak into the next check. */
static void drain(void)
{
	sti();
	delay_ms(5);
	cli();
}

/* 32-bit store to `addr`, then the address right after the store (where an interrupt that the store makes
 * deliverable must be taken). */
static u64 store_then_rip(u64 addr, u32 value)
{
	u64 after;
	__asm__ volatile("movl %k1, (%2)\n\t"
			 "1: lea 1b(%%rip), %0"
			 : "=&r"(after)
			 : "r"(value), "r"(addr)
			 : "memory");
	return after;
}

/* ---- two edge pins with IF=0, then sti; nop ---- */
static void two_pins(void)
{
	irq_set_handler(V_LOW, record_eoi);
	irq_set_handler(V_HIGH, record_eoi);
	reset();
	ioapic_set_entry(LINE_LOW, (u64)cpu_to_apic_id(0) << 56 | V_LOW);
	ioapic_set_entry(LINE_HIGH, (u64)cpu_to_apic_id(0) << 56 | V_HIGH);
	cli();
	testdev_set_irq(LINE_LOW, 1);
	testdev_set_irq(LINE_HIGH, 1);
	bool pending = apic_vector_bit(APIC_IRR, V_LOW) && apic_vector_bit(APIC_IRR, V_HIGH);
	u64 after;
	__asm__ volatile("sti\n\tnop\n\t"
			 "1: lea 1b(%%rip), %0\n\tcli"
			 : "=r"(after)
			 :
			 : "memory");
	u32 taken = norder;
	drain();
	testdev_set_irq(LINE_LOW, 0);
	testdev_set_irq(LINE_HIGH, 0);
	ioapic_set_entry(LINE_LOW, IOAPIC_MASKED);
	ioapic_set_entry(LINE_HIGH, IOAPIC_MASKED);
	check(pending, "both pins pending in irr with IF=0", "IRR bits %u %u", apic_vector_bit(APIC_IRR, V_LOW),
	      apic_vector_bit(APIC_IRR, V_HIGH));
	check(taken >= 1 && order[0] == V_HIGH && rip_of[V_HIGH] == after,
	      "sti shadow, higher pin taken right after the shadow [kvm-late-window]",
	      "%u taken before cli (first %x), saved rip %lx, expected %lx", taken, order[0], rip_of[V_HIGH], after);
	check(taken == 2 && order[1] == V_LOW && rip_of[V_LOW] == after,
	      "lower pin taken at the higher handler's iret [kvm-late-window] [kvm-iret-step]",
	      "%u taken before cli (second %x), saved rip %lx, expected %lx", taken, order[1], rip_of[V_LOW], after);
	irq_set_handler(V_LOW, NULL);
	irq_set_handler(V_HIGH, NULL);
}

/* ---- sti; nop; cli: one instruction boundary with interrupts enabled ---- */
static void sti_window(void)
{
	irq_set_handler(V_LOW, record_eoi);
	reset();
	cli();
	self_ipi(V_LOW);
	u64 after;
	__asm__ volatile("sti\n\tnop\n\t"
			 "1: cli\n\tlea 1b(%%rip), %0"
			 : "=r"(after)
			 :
			 : "memory");
	u32 taken = norder;
	drain();
	check(taken == 1 && rip_of[V_LOW] == after, "sti; nop; cli window takes the interrupt [kvm-late-window]",
	      "%u taken in the window, saved rip %lx, expected %lx", taken, rip_of[V_LOW], after);
	irq_set_handler(V_LOW, NULL);
}

/* ---- a handler's EOI uncovers a vector while IF=0: taken at its IRETQ, before the cli it returns to ---- */
static void iret_outer_handler(struct irq_frame *f, u32 cpu)
{
	record(f);
	self_ipi(V_IRET_INNER); /* held: V_IRET_OUTER's class is in service */
	apic_eoi();             /* uncovers it; IF=0 until the IRETQ */
}
static void iret_to_cli(void)
{
	irq_set_handler(V_IRET_OUTER, iret_outer_handler);
	irq_set_handler(V_IRET_INNER, record_eoi);
	reset();
	cli();
	self_ipi(V_IRET_OUTER);
	u64 after;
	__asm__ volatile("sti\n\tnop\n\t"
			 "1: cli\n\tlea 1b(%%rip), %0"
			 : "=r"(after)
			 :
			 : "memory");
	u32 taken = norder;
	drain();
	check(taken == 2 && order[0] == V_IRET_OUTER && order[1] == V_IRET_INNER && rip_of[V_IRET_INNER] == after,
	      "vector uncovered in a handler taken at its iretq, before the cli [kvm-late-window] [kvm-iret-step]",
	      "%u taken before cli (order %x %x), saved rip %lx, expected %lx", taken, order[0], order[1],
	      rip_of[V_IRET_INNER], after);
	irq_set_handler(V_IRET_OUTER, NULL);
	irq_set_handler(V_IRET_INNER, NULL);
}

/* ---- the same for a handler entered where nothing was stepped: from HLT, and right after the ICR write (IF=1)
 * that sent it. The VMM then does not see the interrupted RIP itself (the exiting instruction completes when
 * the guest is entered again); irqvm's `user` mode reads the return address from the handler's frame. Both
 * handlers must see the address right after the HLT or the store. ---- */
static void iret_to_cli_unstepped(bool from_hlt)
{
	const char *name = from_hlt ? "vector uncovered in a handler entered from hlt taken at its iretq, before the "
				      "cli [kvm-late-window] [kvm-iret-step]"
				    : "vector uncovered in a handler entered at an icr write taken at its iretq, before "
				      "the cli [kvm-late-window] [kvm-iret-step]";
	irq_set_handler(V_IRET_OUTER, iret_outer_handler);
	irq_set_handler(V_IRET_INNER, record_eoi);
	reset();
	cli();
	u64 after;
	if (from_hlt) {
		self_ipi(V_IRET_OUTER);
		__asm__ volatile("sti\n\thlt\n\t"
				 "1: cli\n\tlea 1b(%%rip), %0"
				 : "=r"(after)
				 :
				 : "memory");
	} else {
		__asm__ volatile("sti\n\tmovl %k1, (%2)\n\t"
				 "1: cli\n\tlea 1b(%%rip), %0"
				 : "=&r"(after)
				 : "r"(APIC_SH_SELF | V_IRET_OUTER), "r"(XAPIC + APIC_ICR)
				 : "memory");
	}
	u32 taken = norder;
	drain();
	check(taken == 2 && order[0] == V_IRET_OUTER && order[1] == V_IRET_INNER && rip_of[V_IRET_OUTER] == after &&
		      rip_of[V_IRET_INNER] == after,
	      name, "%u taken before cli (order %x %x), saved rips %lx %lx, expected %lx", taken, order[0], order[1],
	      rip_of[V_IRET_OUTER], rip_of[V_IRET_INNER], after);
	irq_set_handler(V_IRET_OUTER, NULL);
	irq_set_handler(V_IRET_INNER, NULL);
}

/* ---- what the interrupted code holds at that boundary: a VMM that runs the handler's way out (its register
 * restores and IRETQ) itself, as irqvm's `user` mode does where it can, must leave every general register, the
 * flags (CF and DF set here) and RSP exactly as the IRETQ would. The interrupted code fills all fifteen registers
 * with patterns before `sti; nop`; the inner vector's frame and the code after the `cli` must both see them. A way
 * out that stores to memory after the EOI (a counter) must still store, once. ---- */
static u64 pattern(u32 i) { return 0xA5A50000C3C30000ull + i * 0x0000000100010001ull; }
static volatile u64 inner_regs[15], inner_flags, inner_rsp;
static void record_regs_eoi(struct irq_frame *f, u32 cpu)
{
	const u64 r[15] = {f->rax, f->rbx, f->rcx, f->rdx, f->rsi, f->rdi, f->rbp, f->r8,
			   f->r9,  f->r10, f->r11, f->r12, f->r13, f->r14, f->r15};
	for (u32 i = 0; i < 15; i++)
		inner_regs[i] = r[i];
	inner_flags = f->rflags;
	inner_rsp = f->rsp;
	record_eoi(f, cpu);
}
/* Fills every general register but one with a value of its own right before its EOI (the exit after which the
 * vector waits for the IRETQ), so that each register the way out restores differs from the interrupted code's:
 * a restore gone to the wrong register, or skipped, shows. The callee-saved ones make the compiler save and
 * restore them around this handler, which puts their POPs on the way out too. */
static void clobbering_outer_handler(struct irq_frame *f, u32 cpu)
{
	record(f);
	self_ipi(V_IRET_INNER);
	__asm__ volatile("movabs $0x0BADBADBADBADBAD, %%rax\n\t"
			 "mov %%rax, %%rbx\n\tmov %%rax, %%rcx\n\tmov %%rax, %%rdx\n\tmov %%rax, %%rsi\n\t"
			 "mov %%rax, %%rbp\n\tmov %%rax, %%r8\n\tmov %%rax, %%r9\n\tmov %%rax, %%r10\n\t"
			 "mov %%rax, %%r11\n\tmov %%rax, %%r12\n\tmov %%rax, %%r13\n\tmov %%rax, %%r14\n\t"
			 "mov %%rax, %%r15\n\t"
			 "movl $0, (%0)"
			 :
			 : "D"(XAPIC + APIC_EOI)
			 : "rax", "rbx", "rcx", "rdx", "rsi", "rbp", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
			   "memory", "cc");
}
static volatile u32 stores_after_eoi;
static void storing_outer_handler(struct irq_frame *f, u32 cpu)
{
	iret_outer_handler(f, cpu);
	stores_after_eoi++; /* after the EOI: the way out writes memory */
}
static bool registers_across_iret(irq_handler_t outer, bool *regs_ok)
{
	irq_set_handler(V_IRET_OUTER, outer);
	irq_set_handler(V_IRET_INNER, record_regs_eoi);
	reset();
	cli();
	self_ipi(V_IRET_OUTER);
	/* out: rax rbx rcx rdx rsi rdi rbp r8-r15, then RFLAGS, RSP and the RIP after `sti; nop`. */
	u64 out[18];
	__asm__ volatile("push %%rbx\n\tpush %%rbp\n\tpush %%r12\n\tpush %%r13\n\tpush %%r14\n\tpush %%r15\n\t"
			 "push %[out]\n\t"
			 "movabs $0xA5A50000C3C30000, %%rax\n\t"
			 "movabs $0xA5A50001C3C40001, %%rbx\n\t"
			 "movabs $0xA5A50002C3C50002, %%rcx\n\t"
			 "movabs $0xA5A50003C3C60003, %%rdx\n\t"
			 "movabs $0xA5A50004C3C70004, %%rsi\n\t"
			 "movabs $0xA5A50005C3C80005, %%rdi\n\t"
			 "movabs $0xA5A50006C3C90006, %%rbp\n\t"
			 "movabs $0xA5A50007C3CA0007, %%r8\n\t"
			 "movabs $0xA5A50008C3CB0008, %%r9\n\t"
			 "movabs $0xA5A50009C3CC0009, %%r10\n\t"
			 "movabs $0xA5A5000AC3CD000A, %%r11\n\t"
			 "movabs $0xA5A5000BC3CE000B, %%r12\n\t"
			 "movabs $0xA5A5000CC3CF000C, %%r13\n\t"
			 "movabs $0xA5A5000DC3D0000D, %%r14\n\t"
			 "movabs $0xA5A5000EC3D1000E, %%r15\n\t"
			 "stc\n\tstd\n\t"
			 "sti\n\tnop\n\t"
			 "1: cli\n\t"
			 "pushfq\n\t"
			 "push %%rax\n\t"
			 "mov 16(%%rsp), %%rax\n\t"
			 "mov %%rbx, 8(%%rax)\n\tmov %%rcx, 16(%%rax)\n\tmov %%rdx, 24(%%rax)\n\t"
			 "mov %%rsi, 32(%%rax)\n\tmov %%rdi, 40(%%rax)\n\tmov %%rbp, 48(%%rax)\n\t"
			 "mov %%r8, 56(%%rax)\n\tmov %%r9, 64(%%rax)\n\tmov %%r10, 72(%%rax)\n\t"
			 "mov %%r11, 80(%%rax)\n\tmov %%r12, 88(%%rax)\n\tmov %%r13, 96(%%rax)\n\t"
			 "mov %%r14, 104(%%rax)\n\tmov %%r15, 112(%%rax)\n\t"
			 "pop %%rbx\n\tmov %%rbx, 0(%%rax)\n\t"
			 "pop %%rbx\n\tmov %%rbx, 120(%%rax)\n\t"
			 "mov %%rsp, %%rbx\n\tmov %%rbx, 128(%%rax)\n\t"
			 "lea 1b(%%rip), %%rbx\n\tmov %%rbx, 136(%%rax)\n\t"
			 "cld\n\t"
			 "add $8, %%rsp\n\t"
			 "pop %%r15\n\tpop %%r14\n\tpop %%r13\n\tpop %%r12\n\tpop %%rbp\n\tpop %%rbx"
			 :
			 : [out] "r"(out)
			 : "rax", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11", "memory", "cc");
	u32 taken = norder;
	drain();
	/* The interrupted code's own view after its `cli`, and the inner vector's frame if it came in the window. */
	bool after_ok = (out[15] & 0x401) == 0x401, frame_ok = true;
	for (u32 i = 0; i < 15; i++) {
		after_ok = after_ok && out[i] == pattern(i);
		frame_ok = frame_ok && inner_regs[i] == pattern(i);
		if (out[i] != pattern(i) || (taken == 2 && inner_regs[i] != pattern(i)))
			printf("INFO: register %u: %lx in the frame, %lx after, %lx expected\n", i, inner_regs[i], out[i],
			       pattern(i));
	}
	const u64 cf_df_if = 0x1 | 0x400 | 0x200;
	frame_ok = frame_ok && (inner_flags & cf_df_if) == cf_df_if && inner_rsp == out[16];
	bool at_iret = taken == 2 && order[0] == V_IRET_OUTER && order[1] == V_IRET_INNER && rip_of[V_IRET_INNER] == out[17];
	if (!after_ok || !at_iret || !frame_ok)
		printf("INFO: %u taken (order %x %x), rip %lx expected %lx, flags %lx in the frame, %lx after, rsp %lx in "
		       "the frame, %lx after\n",
		       taken, order[0], order[1], rip_of[V_IRET_INNER], out[17], inner_flags, out[15], inner_rsp, out[16]);
	irq_set_handler(V_IRET_OUTER, NULL);
	irq_set_handler(V_IRET_INNER, NULL);
	*regs_ok = after_ok && (taken < 2 || frame_ok);
	return at_iret;
}

static void registers_at_iret(void)
{
	bool regs_ok;
	bool at_iret = registers_across_iret(clobbering_outer_handler, &regs_ok);
	check(regs_ok, "registers and flags intact across a handler that uncovers a vector before its iretq",
	      "see the INFO lines");
	check(at_iret && regs_ok,
	      "registers and flags intact where a vector uncovered in a handler is taken at its iretq "
	      "[kvm-late-window]",
	      "see the INFO lines");
	stores_after_eoi = 0;
	at_iret = registers_across_iret(storing_outer_handler, &regs_ok);
	check(at_iret && regs_ok && stores_after_eoi == 1,
	      "a handler's way out that stores after its eoi stores once, the vector taken at its iretq "
	      "[kvm-late-window]",
	      "%u stores", stores_after_eoi);
}

/* ---- TPR lowered by an xAPIC write (MOV CR8: below, after the long stretch's code) ---- */
static void tpr_write(void)
{
	irq_set_handler(V_TPR, record_eoi);
	reset();
	sti();
	apic_write(APIC_TPR, 0xF0);
	self_ipi(V_TPR);
	bool held = norder == 0 && apic_vector_bit(APIC_IRR, V_TPR);
	u64 after = store_then_rip(XAPIC + APIC_TPR, 0);
	cli();
	u32 taken = norder;
	drain();
	check(held, "vector held by tpr 0xf0", "taken %u, IRR bit %u", taken, apic_vector_bit(APIC_IRR, V_TPR));
	check(taken == 1 && rip_of[V_TPR] == after, "taken right after the tpr write lowers it [kvm-late-window]",
	      "%u taken, saved rip %lx, expected %lx", taken, rip_of[V_TPR], after);
	irq_set_handler(V_TPR, NULL);
}

/* ---- an EOI (IF=1 in the handler) uncovers a vector the in-service one held ---- */
static volatile u64 eoi_after;
static volatile u32 inner_before_eoi;
static void outer_handler(struct irq_frame *f, u32 cpu)
{
	record(f);
	sti();
	self_ipi(V_INNER);
	inner_before_eoi = irq_count[0][V_INNER];
	eoi_after = store_then_rip(XAPIC + APIC_EOI, 0);
	cli();
}
static void eoi_uncovers(void)
{
	irq_set_handler(V_OUTER, outer_handler);
	irq_set_handler(V_INNER, record_eoi);
	reset();
	u32 before = irq_count[0][V_INNER];
	sti();
	self_ipi(V_OUTER);
	wait_ge(&norder, 2, WAIT_MS);
	cli();
	drain();
	check(inner_before_eoi == before && norder == 2 && order[1] == V_INNER && rip_of[V_INNER] == eoi_after,
	      "eoi uncovers the held vector, taken right after the eoi [kvm-late-window]",
	      "taken %u times before the eoi, %u in all, saved rip %lx, expected %lx", inner_before_eoi - before,
	      norder, rip_of[V_INNER], eoi_after);
	irq_set_handler(V_OUTER, NULL);
	irq_set_handler(V_INNER, NULL);
}

/* ---- unmasking an IOAPIC level entry whose line is high ---- */
static void unmask_handler(struct irq_frame *f, u32 cpu)
{
	record(f);
	testdev_set_irq(LINE_HIGH, 0);
	apic_eoi();
}
static void ioapic_unmask(void)
{
	irq_set_handler(V_UNMASK, unmask_handler);
	reset();
	u64 entry = (u64)cpu_to_apic_id(0) << 56 | IOAPIC_LEVEL | V_UNMASK;
	ioapic_set_entry(LINE_HIGH, entry | IOAPIC_MASKED);
	sti();
	testdev_set_irq(LINE_HIGH, 1);
	bool held = norder == 0;
	/* The high half is already written: the IOWIN write of the low half unmasks. */
	*(volatile u32 *)IOAPIC = IOAPIC_REDTBL(LINE_HIGH);
	u64 after = store_then_rip(IOAPIC + 0x10, (u32)entry);
	cli();
	u32 taken = norder;
	drain();
	testdev_set_irq(LINE_HIGH, 0);
	ioapic_set_entry(LINE_HIGH, IOAPIC_MASKED);
	check(held, "masked level entry holds the raised line", "taken %u", taken);
	check(taken == 1 && rip_of[V_UNMASK] == after,
	      "ioapic unmask with the line high, taken right after the iowin write [kvm-late-window]",
	      "%u taken, saved rip %lx, expected %lx", taken, rip_of[V_UNMASK], after);
	irq_set_handler(V_UNMASK, NULL);
}

/* ---- unmasking LVT LINT0 (ExtINT) while the 8259's INTR is high ---- */
static void extint_handler(struct irq_frame *f, u32 cpu)
{
	record(f);
	testdev_set_irq(LINE_LOW, 0);
	pic_eoi(LINE_LOW);
}
static void lint0_unmask(void)
{
	irq_set_handler(V_EXTINT, extint_handler);
	reset();
	pic_init(PIC_BASE, PIC_BASE + 8);
	pic_set_mask((u16)~((1u << LINE_LOW) | (1u << 2)));
	sti();
	testdev_set_irq(LINE_LOW, 1);
	bool held = norder == 0 && (pic_read_irr() & (1u << LINE_LOW));
	u64 after = store_then_rip(XAPIC + APIC_LVT_LINT0, APIC_DM_EXTINT);
	cli();
	u32 taken = norder;
	drain();
	apic_write(APIC_LVT_LINT0, APIC_LVT_MASKED);
	testdev_set_irq(LINE_LOW, 0);
	pic_disable();
	check(held, "pic request held by a masked lint0", "taken %u", taken);
	check(taken == 1 && rip_of[V_EXTINT] == after,
	      "lint0 unmask with the pic's intr high, taken right after the lvt write [kvm-late-window]",
	      "%u taken, saved rip %lx, expected %lx", taken, rip_of[V_EXTINT], after);
	irq_set_handler(V_EXTINT, NULL);
}

/* The 8259 requests on LINE_LOW through an open LINT0 (ExtINT) while IF=0; true if its IRR shows it. */
static bool extint_request_with_if_clear(void)
{
	irq_set_handler(V_EXTINT, extint_handler);
	reset();
	pic_init(PIC_BASE, PIC_BASE + 8);
	pic_set_mask((u16)~((1u << LINE_LOW) | (1u << 2)));
	apic_write(APIC_LVT_LINT0, APIC_DM_EXTINT);
	cli();
	testdev_set_irq(LINE_LOW, 1);
	return pic_read_irr() & (1u << LINE_LOW);
}
/* Checks that the request (`held`) was taken once, at `after`, before anything else could take it; then takes
 * what is left, closes LINT0, lowers the line and disables the 8259s. */
static void extint_check_taken_at(bool held, u64 after, const char *name)
{
	u32 taken = norder;
	drain();
	apic_write(APIC_LVT_LINT0, APIC_LVT_MASKED);
	testdev_set_irq(LINE_LOW, 0);
	pic_disable();
	check(held && taken == 1 && rip_of[V_EXTINT] == after, name,
	      "requested %u, %u taken, saved rip %lx, expected %lx", held, taken, rip_of[V_EXTINT], after);
	irq_set_handler(V_EXTINT, NULL);
}

/* ---- an ExtINT (LINT0 open) waiting for IF: taken right after sti; nop ---- */
static void extint_sti(void)
{
	bool held = extint_request_with_if_clear();
	u64 after;
	__asm__ volatile("sti\n\tnop\n\t"
			 "1: lea 1b(%%rip), %0\n\tcli"
			 : "=r"(after)
			 :
			 : "memory");
	extint_check_taken_at(held, after, "pic interrupt waiting for IF taken right after sti; nop [kvm-late-window]");
}

/* ---- a long IF-clear stretch ending in POPF: taken right after the POPF ---- */
static volatile u32 stretch_rounds = 64;
static volatile u64 stretch_sink;
/* ~8 instructions a round with a branch or two: ~500 instructions with IF clear. */
static __attribute__((noinline)) u64 stretch_mix(u32 rounds)
{
	u64 s = 1;
	for (u32 i = 0; i < rounds; i++) {
		if (s & 1)
			s = s * 3 + i;
		else
			s ^= s >> 2;
	}
	return s;
}
/* Runs the stretch with IF clear, then POPF with IF set in its image; returns the address right after it. */
static u64 stretch_then_popf(void)
{
	u64 flags, after;
	__asm__ volatile("pushfq\n\tpop %0" : "=r"(flags));
	stretch_sink = stretch_mix(stretch_rounds);
	__asm__ volatile("push %1\n\tpopfq\n\t"
			 "1: lea 1b(%%rip), %0\n\tcli"
			 : "=&r"(after)
			 : "r"(flags | 0x200)
			 : "memory", "cc");
	return after;
}
static void popf_after_stretch(void)
{
	irq_set_handler(V_LOW, record_eoi);
	reset();
	cli();
	self_ipi(V_LOW);
	u64 after = stretch_then_popf();
	u32 taken = norder;
	drain();
	check(taken == 1 && rip_of[V_LOW] == after,
	      "taken right after the popf ending a long IF-clear stretch [kvm-late-window]",
	      "%u taken, saved rip %lx, expected %lx", taken, rip_of[V_LOW], after);
	irq_set_handler(V_LOW, NULL);
}
static void extint_after_stretch(void)
{
	bool held = extint_request_with_if_clear();
	u64 after = stretch_then_popf();
	extint_check_taken_at(held, after,
			      "pic interrupt taken right after the popf ending a long IF-clear stretch [kvm-late-window]");
}

/* ---- TPR lowered by MOV CR8, right after the self-IPI or after a long stretch with IF set: taken right after the
 * MOV CR8 ---- */
static void cr8_write(bool long_stretch, const char *held_name, const char *taken_name)
{
	irq_set_handler(V_CR8, record_eoi);
	reset();
	sti();
	__asm__ volatile("mov %0, %%cr8" : : "r"(15ul) : "memory");
	self_ipi(V_CR8);
	if (long_stretch)
		stretch_sink = stretch_mix(stretch_rounds);
	bool held = norder == 0;
	u64 after;
	__asm__ volatile("mov %1, %%cr8\n\t"
			 "1: lea 1b(%%rip), %0"
			 : "=r"(after)
			 : "r"(0ul)
			 : "memory");
	cli();
	u32 taken = norder;
	drain();
	check(held, held_name, "taken %u", taken);
	check(taken == 1 && rip_of[V_CR8] == after, taken_name, "%u taken, saved rip %lx, expected %lx", taken,
	      rip_of[V_CR8], after);
	irq_set_handler(V_CR8, NULL);
}

/* ---- nothing of the VMM's shows: the guest's own TF, PUSHF, DR6 ---- */
static volatile u32 db_count;
static volatile u64 db_rip[8];
static void db_handler(struct irq_frame *f, u32 cpu)
{
	if (db_count < 8)
		db_rip[db_count] = f->rip;
	db_count++;
}
static void no_leaks(void)
{
	irq_set_handler(V_LOW, record_eoi);
	irq_set_handler(1, db_handler);
	__asm__ volatile("mov %0, %%dr6" : : "r"(0ul));
	/* An interrupt waits with IF=0 (what makes a VMM step the guest), while the guest reads RFLAGS and DR6. */
	reset();
	cli();
	self_ipi(V_LOW);
	u64 flags, dr6;
	__asm__ volatile("pushfq\n\tpop %0\n\tmov %%dr6, %1" : "=r"(flags), "=r"(dr6));
	drain();
	check(!(flags & 0x100), "pushf sees no trap flag while an interrupt waits", "rflags %lx", flags);
	check((dr6 & 0xF00F) == 0, "dr6 unchanged while an interrupt waits", "dr6 %lx", dr6);
	/* The guest's own single-stepping, started while an interrupt waits: #DB after each instruction with TF
	 * set at its start (nop, pushf, and, popf), as with nothing pending. */
	reset();
	db_count = 0;
	cli();
	self_ipi(V_LOW);
	u64 start;
	__asm__ volatile("lea 1f(%%rip), %0\n\t"
			 "pushfq\n\torq $0x100, (%%rsp)\n\tpopfq\n\t"
			 "1: nop\n\t"
			 "pushfq\n\tandq $~0x100, (%%rsp)\n\tpopfq"
			 : "=r"(start)
			 :
			 : "memory", "cc");
	u32 n = db_count;
	drain();
	check(n == 4 && db_rip[0] == start + 1, "guest's own trap flag still traps while an interrupt waits",
	      "%u #DB (expected 4), first at %lx, expected %lx", n, db_rip[0], start + 1);
	check(norder == 1, "the waiting interrupt taken once after the guest's single-steps", "%u taken", norder);
	irq_set_handler(1, NULL);
	irq_set_handler(V_LOW, NULL);
}

/* ---- the guest's own execute breakpoint (DR0, DR7.L0: SDM vol. 3 §18.2.4) on an instruction of a handler that
 * runs while a vector it uncovered waits for its IRETQ, where a VMM that runs the handler to its return with a
 * breakpoint of its own would hide the guest's (mainline KVM runs the guest with the VMM's DR7 then; kvm_pvm
 * keeps the guest's working, docs/kvm-facts.md). Each call must raise #DB with DR6.B0, and no other #DB may come
 * (a debug exit of the VMM's own must not reach the guest); an instruction breakpoint is a fault, so the
 * handler sets RF in its frame for the instruction to run on return (§18.3.1.1). The uncovered vector is taken
 * once per round, whenever. ---- */
#define BP_ROUNDS 3
static __attribute__((noinline)) void bp_probe(void) { __asm__ volatile("nop" ::: "memory"); }
static volatile u32 bp_hits, bp_other;
static void bp_db_handler(struct irq_frame *f, u32 cpu)
{
	u64 dr6;
	__asm__ volatile("mov %%dr6, %0" : "=r"(dr6));
	if (f->rip == (u64)(usize)bp_probe && (dr6 & 1))
		bp_hits++;
	else
		bp_other++;
	__asm__ volatile("mov %0, %%dr6" : : "r"(0ul));
	f->rflags |= 1ul << 16; /* RF */
}
static void bp_outer_handler(struct irq_frame *f, u32 cpu)
{
	iret_outer_handler(f, cpu); /* V_IRET_INNER uncovered, IF=0 until the IRETQ */
	bp_probe();
}
static void own_breakpoint(void)
{
	irq_set_handler(V_IRET_OUTER, bp_outer_handler);
	irq_set_handler(V_IRET_INNER, record_eoi);
	irq_set_handler(1, bp_db_handler);
	bp_hits = bp_other = 0;
	__asm__ volatile("mov %0, %%dr6\n\tmov %1, %%dr0\n\tmov %2, %%dr7"
			 :
			 : "r"(0ul), "r"((u64)(usize)bp_probe), "r"(1ul)
			 : "memory");
	u32 inner = 0;
	for (u32 round = 0; round < BP_ROUNDS; round++) {
		reset();
		cli();
		self_ipi(V_IRET_OUTER);
		sti_nop_cli();
		drain();
		inner += norder == 2 && order[0] == V_IRET_OUTER && order[1] == V_IRET_INNER;
	}
	__asm__ volatile("mov %0, %%dr7" : : "r"(0ul) : "memory");
	check(bp_hits == BP_ROUNDS && bp_other == 0 && inner == BP_ROUNDS,
	      "guest's own breakpoint in a handler fires while a vector waits for its iretq",
	      "%u #DB at the breakpoint, %u other, %u of %u rounds took both vectors", bp_hits, bp_other, inner,
	      BP_ROUNDS);
	irq_set_handler(1, NULL);
	irq_set_handler(V_IRET_OUTER, NULL);
	irq_set_handler(V_IRET_INNER, NULL);
}

/* ---- the first stepped instruction faults: its frame carries no TF of the VMM's ---- */
static volatile u64 ud_rflags;
static volatile u32 ud_count;
static void ud_handler(struct irq_frame *f, u32 cpu)
{
	ud_rflags = f->rflags;
	ud_count++;
	f->rip += 2; /* past the ud2 */
}
static void fault_at_first_step(void)
{
	irq_set_handler(V_LOW, record_eoi);
	irq_set_handler(1, db_handler);
	irq_set_handler(6, ud_handler);
	reset();
	db_count = 0;
	ud_count = 0;
	cli();
	/* The ICR write exits and leaves V_LOW waiting for IF: a VMM that steps to the boundary starts at the ud2,
	 * where a single-step trap flag in RFLAGS would go into the #UD frame and come back with its IRETQ. */
	__asm__ volatile("movl %k0, (%1)\n\tud2\n\tnop\n\tnop"
			 :
			 : "r"(APIC_SH_SELF | V_LOW), "r"(XAPIC + APIC_ICR)
			 : "memory");
	u32 db = db_count;
	drain();
	check(ud_count == 1 && !(ud_rflags & 0x100), "a fault where stepping starts pushes no trap flag",
	      "%u #UD, rflags in its frame %lx", ud_count, ud_rflags);
	check(db == 0 && norder == 1, "no #DB after that fault's iretq, the waiting interrupt taken once",
	      "%u #DB, %u taken", db, norder);
	irq_set_handler(6, NULL);
	irq_set_handler(1, NULL);
	irq_set_handler(V_LOW, NULL);
}

void guest_main(void)
{
	platform_init(false);
	two_pins();
	sti_window();
	iret_to_cli();
	iret_to_cli_unstepped(true);
	iret_to_cli_unstepped(false);
	registers_at_iret();
	tpr_write();
	cr8_write(false, "vector held by cr8 15", "taken right after mov cr8 lowers tpr [kvm-late-window]");
	eoi_uncovers();
	ioapic_unmask();
	lint0_unmask();
	extint_sti();
	popf_after_stretch();
	extint_after_stretch();
	cr8_write(true, "vector held by cr8 15 through a long stretch with IF set",
		  "taken right after the mov cr8 ending a long stretch the tpr held [kvm-late-window]");
	no_leaks();
	fault_at_first_step();
	own_breakpoint();
	sti();
}
