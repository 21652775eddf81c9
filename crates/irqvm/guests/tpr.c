/* tpr: task priority and processor priority (SDM vol. 3, 11.8.3): a fixed interrupt is delivered only if its
 * priority class (vector[7:4]) is above PPR[7:4], where PPR = max(TPR, class of the highest ISR bit). A held
 * vector stays in IRR until TPR (or an EOI) lowers PPR. EOI retires the highest-priority ISR bit, so nested
 * interrupts unwind in priority order. All interrupts here are self-IPIs on CPU 0.
 * Checks tagged [isr-kept] need a delivered vector to stay in ISR until its EOI: KVM's in-kernel LAPIC on the
 * kvm_pvm hosts (QEMU -accel kvm, irqvm split/kernel modes) does not keep it (see docs/kvm-facts.md). */
#include "guest.h"

#define V_LOW 0x45   /* class 4 */
#define V_MID 0x55   /* class 5 */
#define V_HIGH 0x65  /* class 6 */
#define V_OUTER 0x50
#define V_INNER 0x70
#define V_SAME 0x72  /* same class as V_INNER, lower vector */
#define V_TOP 0x75

static void self_ipi(u32 v) { apic_icr_write(0, APIC_SH_SELF | v); }

/* ---- held by TPR, taken once TPR drops ---- */
static void tpr_holds(void)
{
	apic_write(APIC_TPR, 0x50);
	check(apic_read(APIC_TPR) == 0x50 && apic_read(APIC_PPR) == 0x50, "ppr follows tpr",
	      "TPR %x PPR %x", apic_read(APIC_TPR), apic_read(APIC_PPR));
	self_ipi(V_LOW);
	self_ipi(V_MID);
	self_ipi(V_HIGH);
	/* Class 6 > 5 is taken; classes 4 and 5 are held. */
	check(wait_ge(&irq_count[0][V_HIGH], 1, WAIT_MS), "class above tpr is taken", "vector %x not taken",
	      V_HIGH);
	delay_ms(20);
	check(irq_count[0][V_LOW] == 0 && irq_count[0][V_MID] == 0, "classes at or below tpr are held",
	      "vector %x taken %u times, %x %u times", V_LOW, irq_count[0][V_LOW], V_MID, irq_count[0][V_MID]);
	check(apic_vector_bit(APIC_IRR, V_LOW) && apic_vector_bit(APIC_IRR, V_MID), "held vectors stay in irr",
	      "IRR bits %u %u", apic_vector_bit(APIC_IRR, V_LOW), apic_vector_bit(APIC_IRR, V_MID));
	check(!apic_vector_bit(APIC_ISR, V_LOW) && !apic_vector_bit(APIC_ISR, V_MID), "held vectors not in isr",
	      "ISR bits set");
	/* TPR 0x40: class 5 > 4 is taken, class 4 still held (equal class). */
	apic_write(APIC_TPR, 0x40);
	check(wait_ge(&irq_count[0][V_MID], 1, WAIT_MS), "lowering tpr releases the higher held class",
	      "vector %x not taken", V_MID);
	delay_ms(20);
	check(irq_count[0][V_LOW] == 0 && apic_vector_bit(APIC_IRR, V_LOW), "class equal to tpr stays held",
	      "vector %x taken %u times", V_LOW, irq_count[0][V_LOW]);
	apic_write(APIC_TPR, 0);
	check(wait_ge(&irq_count[0][V_LOW], 1, WAIT_MS), "tpr 0 releases the last held vector",
	      "vector %x not taken", V_LOW);
	check(irq_count[0][V_LOW] == 1 && irq_count[0][V_MID] == 1 && irq_count[0][V_HIGH] == 1,
	      "each held vector taken once", "%u %u %u", irq_count[0][V_LOW], irq_count[0][V_MID],
	      irq_count[0][V_HIGH]);
	check(apic_read(APIC_PPR) == 0, "ppr 0 when idle", "PPR %x", apic_read(APIC_PPR));
}

/* ---- priority order with IF=0: both pending, the higher one first ---- */
static volatile u32 order[8], norder;
static void record_handler(struct irq_frame *f, u32 cpu)
{
	if (norder < 8)
		order[norder++] = (u32)f->vector;
	apic_eoi();
}
static void priority_order(void)
{
	irq_set_handler(V_LOW, record_handler);
	irq_set_handler(V_HIGH, record_handler);
	norder = 0;
	cli();
	self_ipi(V_LOW);
	self_ipi(V_HIGH);
	delay_ms(10); /* let both reach IRR */
	bool both = apic_vector_bit(APIC_IRR, V_LOW) && apic_vector_bit(APIC_IRR, V_HIGH);
	sti();
	wait_ge(&norder, 2, WAIT_MS);
	check(both, "both vectors pending in irr with IF=0", "IRR bits %u %u", apic_vector_bit(APIC_IRR, V_LOW),
	      apic_vector_bit(APIC_IRR, V_HIGH));
	check(norder == 2 && order[0] == V_HIGH && order[1] == V_LOW, "higher priority vector taken first",
	      "%u taken: %x %x", norder, order[0], order[1]);
	irq_set_handler(V_LOW, NULL);
	irq_set_handler(V_HIGH, NULL);
}

/* ---- nesting: V_OUTER's handler enables interrupts and raises V_INNER, which preempts it ---- */
struct snap { u32 isr_outer, isr_inner, ppr, irr_same; };
static volatile struct snap in_inner, in_outer_after, in_top;
static volatile u32 trace[8], ntrace, same_before_eoi;
static void push_trace(u32 v)
{
	if (ntrace < 8)
		trace[ntrace++] = v;
}
static void inner_handler(struct irq_frame *f, u32 cpu)
{
	push_trace(V_INNER);
	in_inner.isr_outer = apic_vector_bit(APIC_ISR, V_OUTER);
	in_inner.isr_inner = apic_vector_bit(APIC_ISR, V_INNER);
	in_inner.ppr = apic_read(APIC_PPR);
	apic_eoi(); /* retires V_INNER, the highest ISR bit */
	push_trace(V_INNER | 0x100);
}
static void outer_handler(struct irq_frame *f, u32 cpu)
{
	push_trace(V_OUTER);
	sti();
	self_ipi(V_INNER);
	wait_ge(&ntrace, 3, WAIT_MS); /* inner entered and left */
	cli();
	in_outer_after.isr_outer = apic_vector_bit(APIC_ISR, V_OUTER);
	in_outer_after.isr_inner = apic_vector_bit(APIC_ISR, V_INNER);
	in_outer_after.ppr = apic_read(APIC_PPR);
	apic_eoi();
	push_trace(V_OUTER | 0x100);
}
/* V_TOP's handler raises V_SAME (same class, lower vector): held until V_TOP's EOI. */
static void top_handler(struct irq_frame *f, u32 cpu)
{
	push_trace(V_TOP);
	self_ipi(V_SAME);
	sti();
	delay_ms(10);
	same_before_eoi = irq_count[0][V_SAME];
	in_top.irr_same = apic_vector_bit(APIC_IRR, V_SAME);
	in_top.ppr = apic_read(APIC_PPR);
	cli();
	apic_eoi();
	push_trace(V_TOP | 0x100);
}
static void same_handler(struct irq_frame *f, u32 cpu)
{
	push_trace(V_SAME);
	apic_eoi();
}

static void nesting(void)
{
	irq_set_handler(V_OUTER, outer_handler);
	irq_set_handler(V_INNER, inner_handler);
	ntrace = 0;
	self_ipi(V_OUTER);
	wait_ge(&ntrace, 4, WAIT_MS);
	check(ntrace == 4 && trace[0] == V_OUTER && trace[1] == V_INNER && trace[2] == (V_INNER | 0x100) &&
		      trace[3] == (V_OUTER | 0x100),
	      "higher class preempts a running handler", "%u events: %x %x %x %x", ntrace, trace[0], trace[1],
	      trace[2], trace[3]);
	check(in_inner.isr_outer && in_inner.isr_inner && in_inner.ppr == 0x70, "nested isr and ppr [isr-kept]",
	      "ISR outer %u inner %u, PPR %x", in_inner.isr_outer, in_inner.isr_inner, in_inner.ppr);
	check(in_outer_after.isr_outer && !in_outer_after.isr_inner && in_outer_after.ppr == 0x50,
	      "eoi retires the highest isr bit first [isr-kept]", "ISR outer %u inner %u, PPR %x", in_outer_after.isr_outer,
	      in_outer_after.isr_inner, in_outer_after.ppr);
	check(!apic_vector_bit(APIC_ISR, V_OUTER) && apic_read(APIC_PPR) == 0, "isr empty after both eois",
	      "ISR outer %u, PPR %x", apic_vector_bit(APIC_ISR, V_OUTER), apic_read(APIC_PPR));

	irq_set_handler(V_TOP, top_handler);
	irq_set_handler(V_SAME, same_handler);
	ntrace = 0;
	self_ipi(V_TOP);
	wait_ge(&ntrace, 3, WAIT_MS);
	check(same_before_eoi == 0 && in_top.irr_same && in_top.ppr == 0x70,
	      "same class held while in service [isr-kept]", "taken %u times before EOI, IRR %u, PPR %x", same_before_eoi,
	      in_top.irr_same, in_top.ppr);
	check(ntrace == 3 && trace[0] == V_TOP && trace[1] == (V_TOP | 0x100) && trace[2] == V_SAME,
	      "same class taken after eoi [isr-kept]", "%u events: %x %x %x", ntrace, trace[0], trace[1], trace[2]);
}

void guest_main(void)
{
	platform_init(false);
	tpr_holds();
	priority_order();
	nesting();
}
